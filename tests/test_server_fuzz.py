"""A bounded, deterministic fuzz of /v1/completions and /v1/chat/completions (hypothesis): bodies mixing
every request field with values of every JSON type, extreme numbers and odd text. Whatever arrives, the
answer is never a 5xx and the engine is alive and idle afterwards."""
from __future__ import annotations

import json

import httpx
import pytest

from lmstack.engine.llm import LLM
from lmstack.engine.server import build_app
from tests.test_server import NAME, ServerThread, engine_state, make_chat_model

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NUMBERS = st.one_of(st.integers(-3, 300), st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30]),
                    st.floats(allow_nan=False, allow_infinity=False, width=64),
                    st.sampled_from([1e-308, 1e-50, 1e-300, 5e-324, 1e300, -0.0, 0.5, 2.0]))
ODD = st.sampled_from(["", " ", "\ud800", "a\udfffb", "<|im_end|>", "\x00", "{{ x }}", "\u202e", "😐" * 50])
TEXT = st.one_of(st.text(max_size=40), ODD)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
COMMON = ["n", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "logit_bias", "min_tokens", "stop_token_ids", "ignore_eos", "stream",
          "stream_options", "response_format", "structured_outputs", "guided_choice", "guided_regex", "user",
          "skip_special_tokens", "include_stop_str_in_output", "model"]
FIELDS = {
    "/v1/completions": COMMON + ["prompt", "max_tokens", "logprobs", "echo", "suffix", "best_of"],
    "/v1/chat/completions": COMMON + ["messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
                                      "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                                      "add_generation_prompt", "chat_template"],
}
GOOD = {"/v1/completions": {"model": NAME, "prompt": "hello", "max_tokens": 4},
        "/v1/chat/completions": {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}}}
# per field: plausible values (right type, edge and hostile content) most of the time, anything at all
# otherwise, so that most bodies get past validation into tokenization, templating and the engine
PLAUSIBLE = {
    "n": st.integers(-1, 4),
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([1e-308, 1e-50, 5e-324, 0.0, 2.0])),
    "top_p": st.one_of(st.floats(1e-300, 1), st.sampled_from([1e-300, 5e-324, 1.0])),
    "top_k": st.integers(-2, 400), "min_p": st.floats(0, 1), "min_tokens": st.integers(0, 40),
    "repetition_penalty": st.sampled_from([1e-300, 1e300, 1e-5, 0.5, 1.0, 2.0]),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "seed": st.integers(-1, 2**64), "stop": st.one_of(st.none(), TEXT, st.lists(TEXT, max_size=4)),
    "stop_token_ids": st.lists(st.integers(-5, 400), max_size=10),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-5, 400).map(str), TEXT), NUMBERS, max_size=4),
    "ignore_eos": st.booleans(), "stream": st.booleans(), "echo": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "max_tokens": st.integers(-2, 48), "max_completion_tokens": st.integers(-2, 48),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 25)), "top_logprobs": st.integers(-1, 25),
    "prompt": st.one_of(ODD, ODD, TEXT, st.lists(st.integers(-2, 400), max_size=20), st.lists(TEXT, max_size=3)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                                "content": st.one_of(ODD, ODD, TEXT, st.none())}),
                         min_size=1, max_size=4),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "bogus"},
                                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                                            "type": "object", "properties": {"a": {"enum": [1, 2]}}}}},
                                        {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}]),
    "structured_outputs": st.sampled_from([{"choice": ["a", "b"]}, {"regex": "[0-9]{2}"}, {"regex": "("},
                                           {"grammar": "start: \"x\""}, {"json": "{"}, {}, {"choice": []}]),
    "tools": st.sampled_from([[TOOL], [TOOL, TOOL], [{"type": "function"}], []]),
    "tool_choice": st.sampled_from(["auto", "none", "required", "bogus", {"type": "function", "function": {
        "name": "f"}}, {"type": "function", "function": {"name": "g"}}]),
    "chat_template_kwargs": st.sampled_from([{}, {"enable_thinking": False}, {"chat_template": "{{ 1 }}"}]),
}


def body_for(route: str):
    def field(name):
        return st.one_of(PLAUSIBLE[name], PLAUSIBLE[name], PLAUSIBLE[name], VALUE) if name in PLAUSIBLE else VALUE

    text_field = "prompt" if route == "/v1/completions" else "messages"
    # every body carries its text (prompt / messages) drawn from the plausible values: that is where
    # tokenization and templating are reached
    base = st.fixed_dictionaries({text_field: PLAUSIBLE[text_field], "max_tokens": st.integers(0, 16)})
    keys = st.lists(st.sampled_from([f for f in FIELDS[route] if f != text_field]), unique=True, max_size=5)
    extra = keys.flatmap(lambda ks: st.fixed_dictionaries({k: field(k) for k in ks}))
    return st.tuples(base, extra).map(lambda be: {**GOOD[route], **be[0], **be[1]})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = make_chat_model(tmp_path_factory.mktemp("tiny_fuzz"))
    engine = LLM(d, dtype="float32", block_size=8, num_kv_blocks=1024, max_num_seqs=64)
    app = build_app(engine, NAME)
    srv = ServerThread(app)
    srv.engine, srv.async_engine = engine, app.state.async_engine
    yield srv
    srv.stop()


FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("route", list(FIELDS))
def test_fuzz_never_5xx(server, route):
    seen = []

    @FUZZ
    @given(body_for(route))
    def one(body):
        try:
            payload = json.dumps(body)
        except (ValueError, TypeError):
            return
        with httpx.Client(timeout=120) as c:
            if body.get("stream") is True:
                with c.stream("POST", server.url + route, content=payload,
                              headers={"Content-Type": "application/json"}) as r:
                    text = r.read().decode("utf-8", "replace")
            else:
                r = c.post(server.url + route, content=payload, headers={"Content-Type": "application/json"})
                text = r.text
        seen.append(r.status_code)
        assert r.status_code < 500, (body, r.status_code, text[:500])
        assert "internal server error" not in text and "server_error" not in text, (body, text[:500])

    one()
    assert httpx.get(server.url + "/health").status_code == 200
    assert engine_state(server)[0] == 0
    assert 200 in seen and any(400 <= s < 500 for s in seen)  # the fuzz reached both outcomes
