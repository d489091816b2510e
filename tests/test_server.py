"""The OpenAI-compatible server, driven by the official `openai` client on a loopback port.

Reference: a second, independent `LLM` over the same checkpoint run offline (the server must only
translate), the tokenizer's own token counts, and OpenAI's documented response/error shapes.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.server import build_app
from lmstack.tokenizer import Tokenizer
from tests.fixtures import make_tiny_hf
from tests.tok_fixtures import build_test_tokenizer

NAME = "tiny-chat"
MAX_LEN = 256  # the tiny checkpoint's max_position_embeddings


def make_chat_model(out_dir: Path) -> Path:
    """A random qwen2 checkpoint plus a ChatML tokenizer (model vocab 320 >= tokenizer vocab 300).
    Larger-than-default init makes the next token depend on the context (default init is nearly flat)."""
    make_tiny_hf("qwen2", out_dir, seed=0, vocab_size=320, initializer_range=0.3)
    build_test_tokenizer(out_dir, "chatml")
    assert Tokenizer.from_dir(out_dir).vocab_size <= 320
    return out_dir


def make_engine(model_dir: Path) -> LLM:
    return LLM(model_dir, dtype="float32", block_size=8, num_kv_blocks=1024, max_num_seqs=64)


def free_port_for_tests() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return make_chat_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def server(model_dir):
    engine = make_engine(model_dir)
    app = build_app(engine, NAME, max_model_len=MAX_LEN)
    srv = ServerThread(app)
    srv.engine = engine
    srv.async_engine = app.state.async_engine
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ref(model_dir) -> LLM:
    return make_engine(model_dir)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_prompt_ids(ref: LLM, messages: list[dict]) -> list[int]:
    return ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def engine_state(srv) -> tuple[int, object]:
    """(unfinished requests, stats), read on the engine thread between steps."""
    q = srv.async_engine.call(lambda e: (e.get_num_unfinished_requests(), e.get_stats()))
    status, value = q.get(timeout=30)
    assert status == "ok", value
    return value


MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 17 + 25?"}]


# ------------------------------------------------------------------------------------------- basics
def test_models_health_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(server.url + "/health").status_code == 200
    client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    for name in ("lmstack_num_requests_running", "lmstack_num_requests_waiting", "lmstack_kv_cache_usage_perc",
                 "lmstack_prefix_cache_hit_rate", "lmstack_generation_tokens_total"):
        assert name in values, name
    assert values["lmstack_generation_tokens_total"] >= 3
    assert values["lmstack_time_to_first_token_seconds_count"] >= 1
    assert values['lmstack_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        values["lmstack_time_to_first_token_seconds_count"]


def test_chat_matches_offline_engine(client, ref):
    r = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=12, temperature=0)
    want = ref.chat(MSGS, SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(chat_prompt_ids(ref, MSGS))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(client, ref):
    kw = dict(model=NAME, messages=MSGS, max_completion_tokens=10, temperature=0.9, seed=11)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    want = ref.chat(MSGS, SamplingParams(max_tokens=10, temperature=0.9, seed=11))[0].outputs[0]
    assert text == want.text


def test_completions_n2_seed_and_stream(client, ref):
    prompt = "The quick brown fox"
    kw = dict(model=NAME, prompt=prompt, max_tokens=8, n=2, temperature=1.0, seed=1234)
    r = client.completions.create(**kw)
    want = ref.generate([prompt], SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=1234))[0]
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [o.text for o in sorted(want.outputs, key=lambda o: o.index)]
    assert r.choices[0].text != r.choices[1].text  # two independent samples
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)
    # same seed -> same samples; another seed -> other samples
    again = client.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in r.choices]
    # streaming n=2: per-index concatenation equals the non-streaming choices
    texts = {0: "", 1: ""}
    finish = {}
    usage = None
    for ch in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        usage = ch.usage or usage
    assert [texts[0], texts[1]] == [c.text for c in r.choices]
    assert finish == {c.index: c.finish_reason for c in r.choices}
    assert usage.completion_tokens == r.usage.completion_tokens


def test_token_id_prompts_and_batch(client, ref):
    prompts = [[5, 6, 7, 8], [40, 41]]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=5, temperature=0)
    want = ref.generate(prompts, SamplingParams(max_tokens=5, temperature=0))
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [w.outputs[0].text for w in want]
    assert r.usage.prompt_tokens == 6


def test_stop_strings(client):
    kw = dict(model=NAME, prompt="Numbers: 0 1 2", max_tokens=16, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    base = client.completions.create(**kw).choices[0].text
    assert len(base) >= 6, base
    stop = base[3:5]
    cut = base[:base.index(stop)]
    one = client.completions.create(stop=stop, **kw).choices[0]
    assert one.text == cut and one.finish_reason == "stop"
    both = client.completions.create(stop=["\x00never", stop], **kw).choices[0]
    assert both.text == cut
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, stop=[stop], **kw))
    assert streamed == cut


def test_logprobs_shapes(client, ref):
    r = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    want = ref.chat(MSGS, SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0].outputs[0]
    for item, tid, lp in zip(content, want.token_ids, want.logprobs):
        assert len(item.top_logprobs) == 3
        vals = [t.logprob for t in item.top_logprobs]
        assert vals == sorted(vals, reverse=True)
        assert item.logprob == pytest.approx(lp[tid].logprob, abs=1e-4)
        assert item.logprob == pytest.approx(vals[0], abs=1e-6)  # greedy picks the top token
        assert item.bytes == list(item.token.encode("utf-8"))
    # streaming carries the same per-token logprobs
    streamed = [t for c in client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=6, temperature=0,
                                                          logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)

    c = client.completions.create(model=NAME, prompt="Hello world", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(d) <= 2 for d in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    assert lp.token_logprobs[0] == pytest.approx(max(lp.top_logprobs[0].values()), abs=1e-6)


# ------------------------------------------------------------------------------------------- errors
def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_error_paths_then_still_serving(server, client):
    u = server.url + "/v1"
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    # malformed JSON and a missing field: 400 (not FastAPI's 422)
    e = _err(httpx.post(u + "/chat/completions", content=b'{"model": "x", "messages": [',
                        headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in e["message"]
    e = _err(httpx.post(u + "/chat/completions", json={"model": NAME}), 400)
    assert e["param"] == "messages"
    # invalid sampling values name the field
    for field, value in [("temperature", -1.0), ("top_p", 0.0), ("n", 0), ("max_tokens", 0),
                         ("presence_penalty", 5.0), ("top_logprobs", 3)]:
        e = _err(httpx.post(u + "/chat/completions", json={**chat, field: value}), 400)
        assert field in e["message"] or e["param"] == field, (field, e)
    # over the context length: the message states the limit and the actual count
    long_prompt = [7] * 300
    e = _err(httpx.post(u + "/completions", json={"model": NAME, "prompt": long_prompt, "max_tokens": 5}), 400)
    assert str(MAX_LEN) in e["message"] and "305" in e["message"] and "300" in e["message"]
    assert e["code"] == "context_length_exceeded"
    e = _err(httpx.post(u + "/completions", json={"model": NAME, "prompt": [1, 2], "max_tokens": 255}), 400)
    assert "257" in e["message"]
    # token ids outside the vocabulary
    e = _err(httpx.post(u + "/completions", json={"model": NAME, "prompt": [1, 100000], "max_tokens": 2}), 400)
    assert "100000" in e["message"]
    # unknown model: 404; unknown route: 404 in the same shape
    e = _err(httpx.post(u + "/completions", json={"model": "gpt-9", "prompt": "x", "max_tokens": 2}), 404)
    assert e["code"] == "model_not_found" and "gpt-9" in e["message"]
    _err(httpx.get(u + "/nope"), 404)
    # the openai client maps them to its exception classes
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", max_tokens=2, top_p=1.5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=chat["messages"])
    # ... and the server keeps serving
    r = client.chat.completions.create(model=NAME, messages=chat["messages"], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert engine_state(server)[0] == 0


def test_api_key(model_dir):
    engine = LLM(model_dir, dtype="float32", block_size=8, num_kv_blocks=64)
    srv = ServerThread(build_app(engine, NAME, api_key="sekret"))
    try:
        body = {"model": NAME, "prompt": "hi", "max_tokens": 2}
        e = _err(httpx.post(srv.url + "/v1/completions", json=body), 401)
        assert e["code"] == "invalid_api_key"
        _err(httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        _err(httpx.get(srv.url + "/v1/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(**body).usage.completion_tokens >= 1
        assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------- concurrency
def test_32_concurrent_streams_with_disconnects(server, ref):
    """32 streaming clients at once; every 4th hangs up after two chunks. The others must get exactly
    the offline engine's text; afterwards nothing runs and no KV block is held."""
    n_clients, n_tokens = 32, 8
    prompts = [f"Request {i}: say something about {i * 7}" for i in range(n_clients)]
    quitters = set(range(0, n_clients, 4))
    want = ref.generate(prompts, SamplingParams(max_tokens=n_tokens, temperature=0))
    results: dict[int, object] = {}
    aborts_before = server.async_engine.metrics.finished["abort"]
    gen_before = engine_state(server)[1].num_generated_tokens

    def worker(i: int) -> None:
        body = {"model": NAME, "prompt": prompts[i], "stream": True, "temperature": 0,
                "max_tokens": 200 if i in quitters else n_tokens, "ignore_eos": i in quitters}
        text, finish, chunks = "", None, 0
        try:
            with httpx.Client(timeout=120) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    ch = json.loads(line[6:])["choices"][0]
                    text += ch["text"]
                    finish = ch.get("finish_reason") or finish
                    chunks += 1
                    if i in quitters and chunks == 2:
                        break  # leaving the `with` closes the connection mid-stream
            results[i] = (text, finish)
        except Exception as e:  # surfaced by the assertion below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == n_clients
    for i in range(n_clients):
        assert not isinstance(results[i], Exception), (i, results[i])
        if i not in quitters:
            assert results[i] == (want[i].outputs[0].text, want[i].outputs[0].finish_reason), i

    deadline = time.monotonic() + 30
    while True:
        unfinished, stats = engine_state(server)
        if unfinished == 0 and stats.kv_blocks_used == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert unfinished == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_blocks_used == 0, stats
    # the quitters were aborted, not run to their 200 tokens
    assert server.async_engine.metrics.finished["abort"] - aborts_before == len(quitters)
    generated = stats.num_generated_tokens - gen_before
    assert generated < (n_clients - len(quitters)) * n_tokens + len(quitters) * 200


def test_non_streaming_client_that_gives_up_is_aborted(server):
    """A non-streaming client that times out: its request is aborted, not run to max_tokens."""
    aborts_before = server.async_engine.metrics.finished["abort"]
    gen_before = engine_state(server)[1].num_generated_tokens
    # Hold the engine thread so the request cannot finish before the client gives up.
    held = server.async_engine.call(lambda e: time.sleep(2.0))
    body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 240, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    held.get(timeout=30)
    deadline = time.monotonic() + 30
    while server.async_engine.metrics.finished["abort"] == aborts_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.async_engine.metrics.finished["abort"] == aborts_before + 1
    unfinished, stats = engine_state(server)
    assert unfinished == 0 and stats.kv_blocks_used == 0
    assert stats.num_generated_tokens - gen_before < 240


def test_engine_failure_is_reported_not_hung(model_dir):
    """If the engine itself fails mid-stream, the stream ends with an error event, /health turns 503
    and new requests get 503 instead of hanging."""
    engine = make_engine(model_dir)
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated device failure")
        return real_step()

    engine.step = failing_step
    srv = ServerThread(build_app(engine, NAME))
    try:
        body = {"model": NAME, "prompt": "hi", "max_tokens": 50, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert "simulated device failure" in err["message"] and err["type"] == "server_error"
        _err(httpx.get(srv.url + "/health"), 503)
        _err(httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}), 503)
    finally:
        srv.stop()


def test_serve_cli_wiring(model_dir, monkeypatch):
    """`lmstack serve` flags reach the engine and the app (uvicorn.Server.run is replaced by a loopback thread)."""
    import uvicorn

    from lmstack.cli import build_parser

    argv = ["serve", "--model", str(model_dir), "--port", "0", "--served-model-name", "cli-model", "--api-key", "k",
            "--dtype", "float32", "--block-size", "4", "--num-kv-blocks", "100", "--max-model-len", "128",
            "--max-num-seqs", "3", "--no-prefix-caching"]
    seen = {}

    def fake_run(server, *a, **kw):
        monkeypatch.undo()  # the loopback ServerThread below runs a real uvicorn.Server
        app, host, port = server.config.app, server.config.host, server.config.port
        seen.update(host=host, port=port)
        engine = app.state.async_engine.engine
        assert (engine.block_size, engine.block_manager.num_blocks, engine.max_model_len) == (4, 100, 128)
        assert engine.scheduler.max_num_seqs == 3 and not engine.block_manager.enable_prefix_caching
        srv = ServerThread(app)
        try:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)
            assert [m.id for m in c.models.list().data] == ["cli-model"]
            r = c.completions.create(model="cli-model", prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
            seen["tokens"] = r.usage.completion_tokens
            too_long = {"model": "cli-model", "prompt": [1] * 120, "max_tokens": 10}
            e = _err(httpx.post(srv.url + "/v1/completions", json=too_long, headers={"Authorization": "Bearer k"}), 400)
            assert "128" in e["message"]
        finally:
            srv.stop()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    args = build_parser(argv).parse_args(argv)
    assert args.func(args) == 0
    assert seen == {"host": "127.0.0.1", "port": 0, "tokens": 2}
