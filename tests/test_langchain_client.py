"""LangChain's ChatOpenAI against `lmstack serve`: with_structured_output returns a validated pydantic
object by both methods (json_schema: response_format; function_calling: a forced tool call), and
bind_tools yields tool_calls. A tiny random model cannot choose to call a tool, so the calls are the
ones tool_choice forces; the server must enforce, parse and return them in OpenAI's shape."""
from __future__ import annotations

from typing import Literal

import pytest
import torch
from pydantic import BaseModel, Field

from lmstack.engine.llm import LLM
from lmstack.engine.server import build_app
from tests.fixtures import make_tiny_hf
from tests.test_server import ServerThread
from tests.tok_fixtures import build_test_tokenizer

pytest.importorskip("langchain_openai")


class Trip(BaseModel):
    """A trip to plan."""

    city: Literal["Paris", "Oslo", "Lima"]
    days: int = Field(ge=1, le=9)


class Add(BaseModel):
    """Add two digits."""

    a: int = Field(ge=0, le=9)
    b: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from langchain_openai import ChatOpenAI

    d = tmp_path_factory.mktemp("tiny_lc")
    torch.manual_seed(0)
    make_tiny_hf("qwen2", d, seed=0, vocab_size=320, initializer_range=0.3, max_position_embeddings=4096)
    build_test_tokenizer(d, "chatml")
    srv = ServerThread(build_app(LLM(d, dtype="float32", block_size=8, num_kv_blocks=512), "tiny"))
    # a random model loves whitespace: keep the constrained JSON compact so it ends within max_tokens
    yield ChatOpenAI(model="tiny", base_url=srv.url + "/v1", api_key="unused", max_tokens=200, seed=3,
                     max_retries=0, extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    srv.stop()


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(chat_model, method):
    trip = chat_model.with_structured_output(Trip, method=method).invoke("Plan a trip.")
    assert isinstance(trip, Trip) and trip.city in ("Paris", "Oslo", "Lima") and 1 <= trip.days <= 9


def test_bind_tools_yields_tool_calls(chat_model):
    msg = chat_model.bind_tools([Trip, Add], tool_choice="required").invoke("Add 2 and 3.")
    assert msg.tool_calls, msg
    for call in msg.tool_calls:
        schema = {"Trip": Trip, "Add": Add}[call["name"]]
        schema.model_validate(call["args"])
        assert call["id"]
    msg = chat_model.bind_tools([Trip, Add], tool_choice="Add").invoke("Add 2 and 3.")
    assert [c["name"] for c in msg.tool_calls] == ["Add"]
    Add.model_validate(msg.tool_calls[0]["args"])
