"""Nothing a client sends can break the service: poisoned sampling parameters next to 20 healthy
streams, an engine step that raises, hostile bodies (lone surrogates, oversized, half-sent), a queue
that is full, a request that runs too long, a chat_template from the client, and tokenization that
must not block the event loop. Each request fails alone, with a status code; the server keeps serving."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.serve.limits import Limits
from lmstack.engine.server import build_app
from tests.test_server import NAME, ServerThread, engine_state, make_chat_model

MSGS = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("tiny_robust"))


def _engine(model_dir, **kw) -> LLM:
    return LLM(model_dir, dtype="float32", block_size=8, num_kv_blocks=kw.pop("num_kv_blocks", 1024), **kw)


@pytest.fixture(scope="module")
def server(model_dir):
    engine = _engine(model_dir, max_num_seqs=64)
    app = build_app(engine, NAME, limits=Limits(max_request_bytes=200_000, body_timeout_s=1.0,
                                                max_template_chars=20_000))
    srv = ServerThread(app)
    srv.engine, srv.async_engine = engine, app.state.async_engine
    yield srv
    srv.stop()


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


def _stream_tokens(url: str, body: dict) -> tuple[list[int], str | None]:
    """Token count per chunk and the finish reason of a streamed completion."""
    text, finish = [], None
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                assert "error" not in ev, ev
                text.append(ev["choices"][0]["text"])
                finish = ev["choices"][0].get("finish_reason") or finish
    return "".join(text), finish


POISON = [dict(temperature=1e-308), dict(temperature=1e-308, logprobs=3), dict(temperature=1e-50),
          dict(top_p=1e-300), dict(repetition_penalty=1e-300), dict(repetition_penalty=1e-300, temperature=0.7),
          dict(min_tokens=5, stop_token_ids=list(range(320)))]


def test_poisoned_requests_next_to_20_streams(server, model_dir):
    ref = _engine(model_dir)
    prompts = [f"stream number {i} says" for i in range(20)]
    want = [o.outputs[0].text for o in ref.generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                                            ignore_eos=True))]
    got: dict[int, tuple] = {}
    poisoned: list[int] = []

    def healthy(i: int) -> None:
        got[i] = _stream_tokens(server.url, {"model": NAME, "prompt": prompts[i], "max_tokens": 24,
                                             "temperature": 0, "ignore_eos": True})

    def poison(kw: dict) -> None:
        for route, body in (("/v1/completions", {"prompt": "x y z", **kw}), ("/v1/chat/completions",
                                                                           {"messages": MSGS, **kw})):
            r = httpx.post(server.url + route, json={"model": NAME, "max_tokens": 12, **body}, timeout=120)
            poisoned.append(r.status_code)
            if r.status_code == 200:
                c = r.json()["choices"][0]
                assert c["finish_reason"] in ("stop", "length")

    threads = [threading.Thread(target=healthy, args=(i,)) for i in range(20)]
    threads += [threading.Thread(target=poison, args=(kw,)) for kw in POISON]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(20)] == [(w, "length") for w in want]
    assert poisoned and all(s in (200, 400) for s in poisoned), poisoned
    assert httpx.get(server.url + "/health").status_code == 200
    assert engine_state(server)[0] == 0


def test_a_failing_step_fails_the_requests_in_flight_only(model_dir):
    engine = _engine(model_dir)
    real, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("one bad step")
        return real()

    engine.step = step
    srv = ServerThread(build_app(engine, NAME))
    try:
        body = {"model": NAME, "prompt": "hi", "max_tokens": 20, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        err = json.loads(events[-2])["error"]
        assert "one bad step" in err["message"] and events[-1] == "[DONE]"
        assert httpx.get(srv.url + "/health").status_code == 200  # still serving
        r = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked
    finally:
        srv.stop()


def test_hostile_bodies(server):
    u = server.url
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}' % NAME
    e = _err(httpx.post(u + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert e["param"] == "messages" and "surrogate" in e["message"]
    raw = '{"model": "%s", "prompt": "a\\udfffb", "max_tokens": 2}' % NAME
    _err(httpx.post(u + "/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    for field in ("temperature", "repetition_penalty", "top_p"):  # JSON's NaN / Infinity literals
        for lit in ("NaN", "Infinity"):
            raw = '{"model": "%s", "prompt": "hi", "max_tokens": 2, "%s": %s}' % (NAME, field, lit)
            e = _err(httpx.post(u + "/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
            assert e["param"] == field or field in e["message"], e
    big = {"model": NAME, "prompt": "x" * 300_000}
    assert _err(httpx.post(u + "/v1/completions", json=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(30):
            yield b" " * 10_000

    _err(httpx.post(u + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    # half a body, then silence: 408 once the body timeout passes, not a handler held forever
    host, port = u.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\":")
        reply = s.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert httpx.get(u + "/health").status_code == 200


def test_internal_errors_say_nothing_inside(server, monkeypatch):
    tok = server.engine.tokenizer

    def broken(*a, **k):
        raise RuntimeError("secret detail /home/op/.ssh")

    monkeypatch.setattr(tok, "encode", broken)
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "hello", "max_tokens": 2})
    e = _err(r, 500)
    assert "secret" not in r.text and "id err-" in e["message"]


def test_tokenization_runs_off_the_event_loop(server, monkeypatch):
    tok = server.engine.tokenizer
    real, gate, entered = tok.encode, threading.Event(), threading.Event()

    def slow(text, *a, **k):
        if text == "block me":
            entered.set()
            gate.wait(30)
        return real(text, *a, **k)

    monkeypatch.setattr(tok, "encode", slow)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(
        server.url + "/v1/completions", json={"model": NAME, "prompt": "block me", "max_tokens": 2}, timeout=60)))
    t.start()
    assert entered.wait(30)
    try:
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # answered while it tokenizes
        r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "other", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200
    finally:
        gate.set()
        t.join(60)
    assert result["r"].status_code == 200


def test_chat_template_from_the_client(server, model_dir):
    body = {"model": NAME, "messages": MSGS, "max_tokens": 2}
    u = server.url + "/v1/chat/completions"
    evil = "{% for i in range(100000) %}{{ 'x ' * 100000 }}{% endfor %}"
    assert _err(httpx.post(u, json={**body, "chat_template": evil}), 400)["param"] == "chat_template"
    assert _err(httpx.post(u, json={**body, "chat_template_kwargs": {"chat_template": evil}}), 400)["param"] == \
        "chat_template"
    e = _err(httpx.post(u, json={**body, "messages": [{"role": "user", "content": "y" * 30_000}]}), 400)
    assert "exceeds 20000 characters" in e["message"]
    srv = ServerThread(build_app(_engine(model_dir), NAME, limits=Limits(trust_request_chat_template=True,
                                                                         max_template_chars=10_000,
                                                                         template_timeout_s=0.5)))
    try:
        ok = "{% for m in messages %}{{ m.content }}{% endfor %}"
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "chat_template": ok}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
            srv_tok := _engine(model_dir).tokenizer.encode("hi there", add_special_tokens=False)) and srv_tok
        e = _err(httpx.post(srv.url + "/v1/chat/completions", json={**body, "chat_template": evil}, timeout=60), 400)
        assert "exceeds 10000 characters" in e["message"]
        quiet = ("{% for i in range(300) %}{% for j in range(300) %}{% for k in range(1000) %}{% endfor %}"
                 "{% endfor %}{% endfor %}x")  # ~3 s of loops that write nothing
        e = _err(httpx.post(srv.url + "/v1/chat/completions", json={**body, "chat_template": quiet}, timeout=60), 400)
        assert "longer than 0.5 s" in e["message"]
    finally:
        srv.stop()


def test_queue_limit_429_and_request_timeout_504(model_dir):
    engine = _engine(model_dir, max_num_seqs=2)
    real = engine.step
    engine.step = lambda: (time.sleep(0.02), real())[1]  # a slow device: requests stay in flight
    app = build_app(engine, NAME, limits=Limits(max_queued_requests=1, request_timeout_s=3.0))
    srv = ServerThread(app)
    srv.async_engine = app.state.async_engine
    try:
        body = {"model": NAME, "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
        streams = []
        for _ in range(3):  # capacity: 2 running + 1 queued
            cm = httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60)
            r = cm.__enter__()  # the headers come once the engine accepted the request
            assert r.status_code == 200
            streams.append(cm)
        r = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=60)
        e = _err(r, 429)
        assert r.headers["retry-after"] == "1" and e["code"] == "server_overloaded"
        for cm in streams:
            cm.__exit__(None, None, None)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the closed streams free their places
            r = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=60)
            if r.status_code != 429:
                break
        e = _err(r, 504)  # 200 tokens at >= 20 ms a step do not fit in the 3 s request timeout
        assert e["code"] == "request_timeout"
        assert engine_state(srv)[0] == 0
    finally:
        srv.stop()


def test_non_streaming_client_that_leaves_is_aborted_while_tokens_flow(model_dir):
    engine = _engine(model_dir)
    real = engine.step
    engine.step = lambda: (time.sleep(0.01), real())[1]
    app = build_app(engine, NAME)
    srv = ServerThread(app)
    srv.async_engine = app.state.async_engine
    try:
        body = {"model": NAME, "prompt": "hi", "max_tokens": 240, "ignore_eos": True}  # >= 2.4 s of steps
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.5)
        while engine_state(srv)[0] and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        assert engine_state(srv)[0] == 0
        assert engine.get_stats().num_generated_tokens < 240  # stopped early: not run to full length
    finally:
        srv.stop()


def test_a_request_whose_processing_raises_fails_alone(model_dir):
    """A failure inside one request's token processing (here: its detokenizer) stops that request with
    an error to its client; the other request in the same batch completes, token for token."""
    engine = _engine(model_dir)
    real = engine._append_token

    def append(seq, tok, lp):
        if seq.request.request_id.startswith("cmpl-") and seq.request.prompt_token_ids[-1] == 42 \
                and seq.num_output_tokens == 3:
            raise ValueError("poisoned detokenizer state")
        return real(seq, tok, lp)

    engine._append_token = append
    ref = _engine(model_dir).generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    app = build_app(engine, NAME)
    srv = ServerThread(app)
    srv.async_engine = app.state.async_engine
    try:
        results = {}

        def go(key, prompt):
            results[key] = httpx.post(srv.url + "/v1/completions", json={
                "model": NAME, "prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": True,
                "logprobs": 0}, timeout=60)

        ts = [threading.Thread(target=go, args=("bad", [5, 6, 42])), threading.Thread(target=go, args=("ok", [5, 6, 7]))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        e = _err(results["bad"], 500)
        assert "poisoned" not in e["message"] and e["type"] == "server_error"
        good = results["ok"].json()["choices"][0]
        assert good["finish_reason"] == "length" and good["text"] == ref[0].outputs[0].text
        assert engine_state(srv)[0] == 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        srv.stop()


def test_half_sent_headers_are_cut_off(model_dir):
    import uvicorn

    from lmstack.engine.server import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(build_app(_engine(model_dir), NAME), "127.0.0.1", port,
                                           header_timeout_s=0.5))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        while not server.started:
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
            assert s.recv(1024) == b""  # closed by the server, not left open
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


def test_serve_exits_with_status_1_when_the_engine_cannot_go_on(model_dir, monkeypatch):
    from lmstack.cli import build_parser
    from tests.test_server import free_port_for_tests

    def broken(self):
        raise RuntimeError("device lost")

    monkeypatch.setattr(LLM, "step", broken)
    port = free_port_for_tests()
    argv = ["serve", "--model", str(model_dir), "--port", str(port), "--dtype", "float32", "--num-kv-blocks", "64"]
    args = build_parser(argv).parse_args(argv)
    status = {}
    t = threading.Thread(target=lambda: status.update(rc=args.func(args)), daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 500
    t.join(60)
    assert status == {"rc": 1}
