"""What real clients send beyond plain generation, through the official `openai` client against
`lmstack serve` on a loopback port: prompt log-probs (echo + logprobs + max_tokens=0, lm-eval's
log-likelihood request) checked against transformers, vLLM's tokenizer routes, logit_bias, structured
output (response_format, structured_outputs) validated with jsonschema, and tool calls (tools in the
template, tool_choice enforced, replies parsed into tool_calls, streamed and not)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

from lmstack.engine.llm import LLM
from lmstack.engine.server import build_app
from tests.fixtures import make_tiny_hf
from tests.test_server import ServerThread
from tests.tok_fixtures import build_test_tokenizer

NAME = "tiny-tools"

# bounded, so a random model under the constraint always completes within max_tokens
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": CITY}},
    {"type": "function", "function": {"name": "add", "description": "Add two digits", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_tools")
    torch.manual_seed(0)
    make_tiny_hf("qwen2", d, seed=0, vocab_size=320, initializer_range=0.3, max_position_embeddings=4096)
    build_test_tokenizer(d, "chatml")  # Qwen2.5's template: tools in the system turn, <tool_call> JSON
    return d


@pytest.fixture(scope="module")
def server(model_dir):
    engine = LLM(model_dir, dtype="float32", block_size=8, num_kv_blocks=512, max_num_seqs=16)
    srv = ServerThread(build_app(engine, NAME))
    srv.engine = engine
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


# ------------------------------------------------------------------------------------------ prompt log-probs
def _hf_logprobs(model_dir: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        lp = m(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
    return lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], lp[:-1]


def test_echo_logprobs_max_tokens_0_match_transformers(server, client, model_dir):
    ids = server.engine.tokenizer.encode("The weather in Paris is mild and the weather in Oslo is cold.")
    want, full = _hf_logprobs(model_dir, ids)
    for attempt in range(2):  # the second time the prompt's blocks are in the prefix cache
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "length" and r.usage.completion_tokens == 0
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = torch.tensor(lp.token_logprobs[1:])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        for j, top in enumerate(lp.top_logprobs[1:]):  # the top-2 alternatives, by value
            best = full[j].topk(2).values
            assert max(top.values()) == pytest.approx(float(best[0]), abs=2e-4)
            assert len(top) <= 3  # the actual token plus the top 2 (fewer where they decode alike)
        assert "".join(lp.tokens) == c.text == server.engine.tokenizer.decode(ids)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


def test_echo_with_generation_streamed_and_not(server, client):
    prompt = "Once upon a time"
    ids = server.engine.tokenizer.encode(prompt)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text.startswith(prompt) and len(c.logprobs.tokens) == len(ids) + r.usage.completion_tokens
    assert c.logprobs.token_logprobs[0] is None and all(x is not None for x in c.logprobs.token_logprobs[1:])
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=3, echo=True, logprobs=1,
                                            temperature=0, stream=True))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    toks = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.token_logprobs]
    assert text == c.text and toks == c.logprobs.token_logprobs
    # max_tokens=0 without echo does nothing: refused, naming the field
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt=prompt, max_tokens=0)


# ------------------------------------------------------------------------------------------ small routes
def test_tokenize_detokenize_tokenizer_info_model_card(server, client):
    tok = server.engine.tokenizer
    r = httpx.post(server.url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("hello world", add_special_tokens=False) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.engine.max_model_len
    r2 = httpx.post(server.url + "/tokenize", json={"messages": MSGS}).json()
    assert r2["tokens"] == tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True)
    d = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert d == {"prompt": "hello world"}
    _err(httpx.post(server.url + "/detokenize", json={"tokens": [10**6]}), 400)
    _err(httpx.post(server.url + "/tokenize", json={"prompt": "x", "bogus": 1}), 400)
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_logit_bias(server, client):
    base = client.completions.create(model=NAME, prompt="abc", max_tokens=4, temperature=0, extra_body={
        "ignore_eos": True})
    first = server.engine.tokenizer.encode(base.choices[0].text, add_special_tokens=False)[0]
    forced = client.completions.create(model=NAME, prompt="abc", max_tokens=4, temperature=0, logprobs=0,
                                       logit_bias={"65": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].logprobs.tokens == [server.engine.tokenizer.decode([65])] * 4
    banned = client.completions.create(model=NAME, prompt="abc", max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(first): -100})
    assert server.engine.tokenizer.encode(banned.choices[0].text, add_special_tokens=False)[:1] != [first]
    for bias, what in [({"999999": 1}, "outside the vocabulary"), ({"5": 101}, "[-100, 100]"),
                       ({"x": 1}, "token ids")]:
        with pytest.raises(openai.BadRequestError, match="logit_bias") as e:
            client.completions.create(model=NAME, prompt="abc", max_tokens=1, logit_bias=bias)
        assert what in str(e.value)


# ------------------------------------------------------------------------------------------ structured output
def test_response_format_json_schema_strict_and_json_object(client):
    rf = {"type": "json_schema", "json_schema": {"name": "trip", "schema": CITY, "strict": True}}
    compact = {"structured_outputs": {"disable_any_whitespace": True}}  # a random model loves whitespace
    r = client.chat.completions.create(model=NAME, messages=MSGS, response_format=rf, n=3, seed=1, max_tokens=64,
                                       extra_body=compact)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), CITY)
    chunks = list(client.chat.completions.create(model=NAME, messages=MSGS, response_format=rf, seed=2,
                                                 max_tokens=64, stream=True, extra_body=compact))
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)), CITY)
    r = client.chat.completions.create(model=NAME, messages=MSGS, response_format={"type": "json_object"}, seed=3,
                                       max_tokens=200, temperature=0.0)
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel

    class Trip(BaseModel):
        city: Literal["Paris", "Oslo", "Lima"]
        days: int

    r = client.chat.completions.parse(model=NAME, messages=MSGS, response_format=Trip, max_tokens=64, seed=4)
    trip = r.choices[0].message.parsed
    assert isinstance(trip, Trip) and trip.city in ("Paris", "Oslo", "Lima")


def test_structured_outputs_extras_and_errors(server, client):
    r = client.chat.completions.create(model=NAME, messages=MSGS, n=4, seed=5, max_tokens=16,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.message.content for c in r.choices} <= {"yes", "no"}
    r = client.completions.create(model=NAME, prompt="id:", max_tokens=16, seed=6,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert __import__("re").fullmatch("[A-Z]{2}-[0-9]{3}", r.choices[0].text)
    r = client.completions.create(model=NAME, prompt="id:", max_tokens=16, seed=6,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    body = {"model": NAME, "messages": MSGS, "max_tokens": 8}
    u = server.url + "/v1/chat/completions"
    assert _err(httpx.post(u, json={**body, "response_format": {"type": "bogus"}}), 400)["param"] == "response_format"
    e = _err(httpx.post(u, json={**body, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}}), 400)
    assert "uniqueItems" in e["message"]
    e = _err(httpx.post(u, json={**body, "structured_outputs": {"regex": "a", "choice": ["b"]}}), 400)
    assert e["param"] == "structured_outputs" and "exactly one" in e["message"]
    e = _err(httpx.post(u, json={**body, "response_format": {"type": "json_object"},
                                 "structured_outputs": {"choice": ["b"]}}), 400)
    assert "one output constraint" in e["message"]
    for field, value in [("audio", {"voice": "alloy"}), ("prediction", {"type": "content", "content": "x"}),
                         ("modalities", ["text", "audio"])]:
        assert _err(httpx.post(u, json={**body, field: value}), 400)["param"] == field


# ------------------------------------------------------------------------------------------ tools
def _check_call(call, names=("get_weather", "add")) -> None:
    assert call.type == "function" and call.id and call.function.name in names
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_choice_required_and_named(server, client):
    compact = {"structured_outputs": {"disable_any_whitespace": True}}  # a random model loves whitespace
    r = client.chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, tool_choice="required", n=3,
                                       seed=7, max_tokens=200, extra_body=compact)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
        for call in c.message.tool_calls:
            _check_call(call)
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, tool_choice=named, seed=8,
                                       max_tokens=200, parallel_tool_calls=False, extra_body=compact)
    (call,) = r.choices[0].message.tool_calls
    _check_call(call, ("add",))
    # streamed: the id and name come first, then argument pieces that add up to the same call
    chunks = list(client.chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, tool_choice=named, seed=8,
                                                 max_tokens=200, parallel_tool_calls=False, stream=True,
                                                 extra_body=compact))
    pieces = [tc for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls for tc in ch.choices[0].delta.tool_calls]
    assert pieces[0].id and pieces[0].function.name == "add" and all(p.index == 0 for p in pieces)
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_reach_the_template_and_errors(server, client):
    tok = server.engine.tokenizer
    want = tok.apply_chat_template(MSGS, add_generation_prompt=True, tools=TOOLS, tokenize=True)
    r = client.chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, max_tokens=1)
    assert r.usage.prompt_tokens == len(want)  # the tool signatures are in the prompt
    r = client.chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError, match="nope"):
        client.chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model=NAME, messages=MSGS, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]"):
        client.chat.completions.create(model=NAME, messages=MSGS, tools=[{"type": "function", "function": {}}])


def test_auto_tool_calls_are_parsed_from_the_reply(server, client):
    """A tiny random model cannot decide to call a tool: force the hermes-format reply text through a
    grammar (structured_outputs) with tool_choice auto, and the parser must turn it into tool_calls."""
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'
    so = {"grammar": f"start: {json.dumps(reply)}"}
    r = client.chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, max_tokens=100,
                                       extra_body={"structured_outputs": so})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo", "days": 3}
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, max_tokens=100, stream=True,
                                                 extra_body={"structured_outputs": so}))
    pieces = [tc for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls for tc in ch.choices[0].delta.tool_calls]
    assert pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "Oslo", "days": 3}
