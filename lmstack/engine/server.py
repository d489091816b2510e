"""OpenAI-compatible HTTP server: `lmstack serve --model DIR`.

One thread owns the engine (`AsyncEngine`): it is the only code that calls `add_request`, `step` and
`abort`, so the engine needs no locks. HTTP handlers run on the asyncio event loop; they validate
and tokenize a request, hand it to the engine thread through a command queue, and read the
engine's RequestOutputs back from a per-request asyncio.Queue (filled with
`loop.call_soon_threadsafe`). Handlers only translate between OpenAI's JSON and engine calls.

A client that goes away (disconnect mid-stream, cancelled request) makes the handler abort its
engine requests, which frees their KV blocks at once.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import queue
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.engine.openai_protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                            ChatCompletionResponse, ChatLogprobs, ChatLogprobToken, ChatStreamChoice,
                                            CompletionChoice, CompletionChunk, CompletionLogProbs, CompletionRequest,
                                            CompletionResponse, DeltaMessage, ErrorInfo, ErrorResponse, ModelCard,
                                            ModelList, ProtocolError, TopLogprob, UsageInfo, random_id)
from lmstack.engine.sampling_params import SamplingParams
from lmstack.log import logger

# Prometheus histogram buckets for time to first token, in seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# ============================================================================ the engine thread
@dataclass
class _Stream:
    """Where the engine thread sends one engine request's outputs."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    key: Any  # the caller's label for this engine request (e.g. the prompt's index)
    arrival: float
    first_token_seen: bool = False


@dataclass
class ServerMetrics:
    """Counters the engine thread keeps for /metrics (engine gauges come from `engine.get_stats()`)."""

    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_count: int = 0
    ttft_sum: float = 0.0
    finished: Counter = field(default_factory=Counter)  # finish_reason -> requests

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_count += 1
        self.ttft_sum += seconds
        for i, b in enumerate(TTFT_BUCKETS):
            if seconds <= b:
                self.ttft_buckets[i] += 1


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    """Drives an `LLM` from one background thread; the asyncio side submits, aborts and awaits."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # engine-thread only
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self.metrics = ServerMetrics()
        self.stats = engine.get_stats()  # snapshot refreshed by the engine thread after each step
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lmstack-engine", daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.error is None and not self._stop.is_set()

    # ------------------------------------------------------------------ asyncio side
    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, out: asyncio.Queue,
                  key: Any = None) -> None:
        """Queue a request; returns once the engine accepted it (raises the engine's error if not).
        Its RequestOutputs then arrive on `out` as (key, output); an engine failure as (key, exception)."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self.error!r})")
        self.start()
        loop = asyncio.get_running_loop()
        ack: asyncio.Future = loop.create_future()
        self._inbox.put(("add", request_id, prompt_ids, params, _Stream(loop, out, key, time.perf_counter()), ack))
        await ack

    def abort(self, request_id: str) -> None:
        """Abort from any thread; a request that already finished is ignored."""
        self._inbox.put(("abort", request_id))

    def call(self, fn: Callable[[Any], Any]) -> "queue.Queue":
        """Run fn(engine) on the engine thread between steps (tests, admin); the result arrives on the
        returned queue.Queue as ("ok", value) or ("error", exception)."""
        self.start()
        q: queue.Queue = queue.Queue(1)
        self._inbox.put(("call", fn, q))
        return q

    # ------------------------------------------------------------------ engine thread
    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # that event loop is closed (its server stopped): nobody to tell
            pass

    @staticmethod
    def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
        if fut.done():  # the handler was cancelled while waiting
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, params, stream, ack = cmd
            try:
                self.engine.add_request(rid, ids, params)
            except Exception as e:  # invalid request: reported to its handler only
                self._post(stream.loop, self._resolve, ack, e)
                return
            self._streams[rid] = stream
            self._post(stream.loop, self._resolve, ack, None)
        elif kind == "abort":
            rid = cmd[1]
            if self._streams.pop(rid, None) is not None:
                self.engine.abort(rid)
                self.metrics.finished["abort"] += 1
        elif kind == "wake":
            pass
        elif kind == "call":
            _, fn, q = cmd
            try:
                q.put(("ok", fn(self.engine)))
            except Exception as e:
                q.put(("error", e))

    def _deliver(self, outputs: list) -> None:
        now = time.perf_counter()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted by us: nobody listens any more
                continue
            if not stream.first_token_seen and any(o.token_ids for o in out.outputs):
                stream.first_token_seen = True
                self.metrics.observe_ttft(now - stream.arrival)
            if out.finished:
                del self._streams[out.request_id]
                reasons = [o.finish_reason for o in out.outputs]
                self.metrics.finished[reasons[0] if reasons and reasons[0] else "stop"] += 1
            self._post(stream.loop, stream.queue.put_nowait, (stream.key, out))

    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                if not eng.has_unfinished_requests():
                    self._handle(self._inbox.get())  # idle: sleep until a command arrives
                while True:  # between steps: take whatever else has arrived, without waiting
                    try:
                        self._handle(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if self._stop.is_set():
                    break
                # step() also reports aborted requests; with nothing left to run it just returns them
                # (so aborts never pile up while idle).
                outs = eng.step()
                self._deliver(outs)
                self.stats = eng.get_stats()
        except BaseException as e:  # a bug or OOM in the engine: fail every open request loudly
            logger.exception("engine thread failed")
            self.error = e
            for stream in self._streams.values():
                self._post(stream.loop, stream.queue.put_nowait, (stream.key, e))
            self._streams.clear()


# ============================================================================ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    parts, param = [], None
    for e in errs[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            parts.append(f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}")
            continue
        if not loc and e.get("type") in ("model_attributes_type", "dict_type", "missing"):
            parts.append("the request body must be a JSON object (malformed JSON or wrong Content-Type)")
            continue
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {e.get('msg')}")
    return "; ".join(parts), param


# ============================================================================ the app
def _sse(obj: Any) -> str:
    payload = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {payload}\n\n"


async def _sse_guard(gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """After the 200 and its headers are sent, an error can only travel as an event (as OpenAI does)."""
    try:
        async for piece in gen:
            yield piece
    except APIError as e:
        yield _sse(ErrorResponse(error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code)))
        yield "data: [DONE]\n\n"


class _AbortingStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however the response ends (finished, client gone,
    cancelled): starlette stops iterating a body on disconnect without closing the generator."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class _Translator:
    """Engine outputs -> OpenAI response pieces, for one HTTP request."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._piece_cache: dict[int, str] = {}

    def piece(self, token_id: int, lp: Any = None) -> str:
        if lp is not None and getattr(lp, "decoded_token", None) is not None:
            return lp.decoded_token
        s = self._piece_cache.get(token_id)
        if s is None:
            s = self.tok.decode([token_id], skip_special_tokens=False) if self.tok is not None else str(token_id)
            self._piece_cache[token_id] = s
        return s

    @staticmethod
    def _top(lp: dict, k: int) -> list[tuple[int, Any]]:
        return sorted(((t, l) for t, l in lp.items() if l.rank <= k), key=lambda x: x[1].rank)[:k]

    def chat_logprobs(self, token_ids: list[int], lps: list[dict] | None, k: int) -> ChatLogprobs | None:
        if lps is None:
            return None
        content = []
        for tid, lp in zip(token_ids, lps):
            s = self.piece(tid, lp.get(tid))
            top = [TopLogprob(token=(p := self.piece(t, l)), logprob=l.logprob, bytes=list(p.encode("utf-8")))
                   for t, l in self._top(lp, k)]
            content.append(ChatLogprobToken(token=s, logprob=lp[tid].logprob, bytes=list(s.encode("utf-8")),
                                            top_logprobs=top))
        return ChatLogprobs(content=content)

    def completion_logprobs(self, token_ids: list[int], lps: list[dict] | None, k: int,
                            offset: int) -> tuple[CompletionLogProbs | None, int]:
        """Returns the logprobs block and the text offset after these tokens."""
        if lps is None:
            return None, offset
        out = CompletionLogProbs()
        for tid, lp in zip(token_ids, lps):
            s = self.piece(tid, lp.get(tid))
            out.tokens.append(s)
            out.token_logprobs.append(lp[tid].logprob)
            top: dict[str, float] = {}
            for t, l in self._top(lp, k):  # in rank order: two ids that decode alike keep the likelier
                top.setdefault(self.piece(t, l), l.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(s)
        return out, offset


def build_app(engine: Any, served_model_name: str, api_key: str | None = None,
              max_model_len: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (an `LLM`) under the model name `served_model_name`.
    `app.state.async_engine` is the engine driver (its thread starts with the app or the first request)."""
    max_len = int(max_model_len or engine.max_model_len)
    tokenizer = engine.tokenizer
    async_engine = AsyncEngine(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        async_engine.shutdown()

    app = FastAPI(title="lmstack", lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.served_model_name = served_model_name

    # ---------------------------------------------------------------- errors in OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(ProtocolError)
    async def _protocol_error(_: Request, e: ProtocolError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI says 422; OpenAI clients expect 400 with the error object.
        msg, param = _validation_message(e)
        return error_response(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal server error")
        return error_response(500, f"internal server error: {type(e).__name__}: {e}", type="internal_server_error")

    # ---------------------------------------------------------------- shared checks
    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                           code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{served_model_name}`.",
                           param="model", code="model_not_found")

    def check_alive() -> None:
        if not async_engine.alive:
            raise APIError(503, f"the engine has stopped: {async_engine.error!r}", type="server_error")

    def budget(prompt_len: int, requested: int | None, what: str) -> int | None:
        """Validate the context budget before any work; returns max_tokens for the engine."""
        if requested is not None and requested < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {requested}", param="max_tokens")
        if prompt_len == 0:
            raise APIError(400, f"the {what} is empty (0 tokens)", param="prompt" if what == "prompt" else "messages")
        total = prompt_len + (requested or 0)
        if prompt_len >= max_len or total > max_len:
            msg = (f"This model's maximum context length is {max_len} tokens. However, you requested {total} "
                   f"tokens ({prompt_len} in the {what}, {requested or 0} in the completion). "
                   f"Please reduce the length of the {what} or completion.")
            raise APIError(400, msg, param="messages" if what == "messages" else "prompt",
                           code="context_length_exceeded")
        return requested

    async def submit(http_id: str, prompts: list[list[int]], params: list[SamplingParams],
                     out: asyncio.Queue) -> list[str]:
        rids = []
        try:
            for i, (ids, sp) in enumerate(zip(prompts, params)):
                rid = f"{http_id}-{i}"
                rids.append(rid)
                await async_engine.add(rid, ids, sp, out, key=i)
        except BaseException as e:
            for rid in rids:
                async_engine.abort(rid)
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e), type="server_error") from e
            if isinstance(e, ValueError):  # the engine refused it (e.g. does not fit the KV pool)
                raise APIError(400, str(e)) from e
            raise
        return rids

    async def results(raw: Request, out: asyncio.Queue, rids: list[str], stream: bool) -> AsyncIterator[Any]:
        """Yield (prompt index, RequestOutput) until every request finished; abort leftovers on exit."""
        pending = set(range(len(rids)))
        try:
            if not stream and await raw.is_disconnected():  # gave up while we were queueing it
                return
            while pending:
                if stream:  # a disconnect cancels the streaming task (and _AbortingStream aborts)
                    key, item = await out.get()
                else:
                    try:
                        key, item = await asyncio.wait_for(out.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        # Non-streaming handlers are not cancelled when the client leaves: look ourselves.
                        if await raw.is_disconnected():
                            return
                        continue
                if isinstance(item, BaseException):
                    raise APIError(500, f"engine failed: {item!r}", type="server_error")
                if item.finished:
                    pending.discard(key)
                yield key, item
        finally:
            for k in pending:
                async_engine.abort(rids[k])

    def tokenize_text(text: str, add_special_tokens: bool) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send prompts as token ids", param="prompt")
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    # ---------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> JSONResponse:
        if not async_engine.alive:
            return error_response(503, f"engine stopped: {async_engine.error!r}", type="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(raw: Request) -> ModelList:
        check_auth(raw)
        return ModelList(data=[ModelCard(id=served_model_name, max_model_len=max_len)])

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(async_engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_auth(raw)
        check_model(req.model)
        check_alive()
        vocab = engine.model.config.vocab_size
        prompts: list[list[int]] = []
        texts: list[str] = []
        for p in req.prompts():
            if isinstance(p, str):
                ids = tokenize_text(p, add_special_tokens=True)
                texts.append(p)
            else:
                bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})",
                                   param="prompt")
                ids = list(p)
                texts.append(tokenizer.decode(ids) if (req.echo and tokenizer is not None) else "")
            budget(len(ids), req.max_tokens, "prompt")
            prompts.append(ids)
        params = [req.to_sampling_params(req.max_tokens) for _ in prompts]
        http_id = random_id("cmpl")
        created = int(time.time())
        out: asyncio.Queue = asyncio.Queue()
        rids = await submit(http_id, prompts, params, out)
        n = req.n
        k = req.logprobs or 0
        tr = _Translator(tokenizer)
        n_prompt = sum(len(p) for p in prompts)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def gen() -> AsyncIterator[str]:
                offsets: dict[int, int] = {}
                echoed: set[int] = set()
                n_out = 0
                async for key, ro in results(raw, out, rids, stream=True):
                    choices = []
                    for o in ro.outputs:
                        idx = key * n + o.index
                        text = o.delta_text
                        if req.echo and idx not in echoed:
                            echoed.add(idx)
                            text = texts[key] + text
                        n_out += len(o.delta_token_ids)
                        if not text and not o.delta_token_ids and o.finish_reason is None:
                            continue
                        lp, offsets[idx] = tr.completion_logprobs(o.delta_token_ids, o.delta_logprobs, k,
                                                                  offsets.get(idx, 0))
                        choices.append(CompletionChoice(index=idx, text=text, logprobs=lp,
                                                        finish_reason=o.finish_reason))
                    if choices:
                        yield _sse(CompletionChunk(id=http_id, created=created, model=served_model_name,
                                                   choices=choices))
                if include_usage:
                    usage = UsageInfo(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)
                    yield _sse(CompletionChunk(id=http_id, created=created, model=served_model_name, choices=[],
                                               usage=usage))
                yield "data: [DONE]\n\n"

            return _AbortingStream(_sse_guard(gen()), lambda: [async_engine.abort(r) for r in rids])

        final: dict[int, Any] = {}
        async for key, ro in results(raw, out, rids, stream=False):
            if ro.finished:
                final[key] = ro
        if len(final) < len(rids):  # client went away
            return JSONResponse({}, status_code=499)
        choices = []
        n_out = 0
        for key in range(len(rids)):
            for o in final[key].outputs:
                lp, _ = tr.completion_logprobs(o.token_ids, o.logprobs, k, 0)
                text = (texts[key] if req.echo else "") + o.text
                choices.append(CompletionChoice(index=key * n + o.index, text=text, logprobs=lp,
                                                finish_reason=o.finish_reason))
                n_out += len(o.token_ids)
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=http_id, created=created, model=served_model_name, choices=choices,
                                  usage=UsageInfo(prompt_tokens=n_prompt, completion_tokens=n_out,
                                                  total_tokens=n_prompt + n_out))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        check_auth(raw)
        check_model(req.model)
        check_alive()
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer / chat template", param="messages")
        try:
            text = tokenizer.apply_chat_template(req.template_messages(),
                                                 add_generation_prompt=req.add_generation_prompt, tokenize=False,
                                                 tools=req.tools, **(req.chat_template_kwargs or {}))
        except ProtocolError:
            raise
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"could not apply the chat template: {e}", param="messages") from e
        ids = tokenize_text(text, add_special_tokens=False)  # the template already wrote BOS if any
        max_tokens = budget(len(ids), req.requested_max_tokens(), "messages")
        params = req.to_sampling_params(max_tokens)
        http_id = random_id("chatcmpl")
        created = int(time.time())
        out: asyncio.Queue = asyncio.Queue()
        rids = await submit(http_id, [ids], [params], out)
        k = req.top_logprobs or 0
        tr = _Translator(tokenizer)
        n_prompt = len(ids)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
                return _sse(ChatCompletionChunk(id=http_id, created=created, model=served_model_name,
                                                choices=choices, usage=usage))

            async def gen() -> AsyncIterator[str]:
                # OpenAI sends the role first, then content deltas, then an empty delta with finish_reason.
                yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                             for i in range(req.n)])
                n_out = 0
                async for _, ro in results(raw, out, rids, stream=True):
                    content, finished = [], []
                    for o in ro.outputs:
                        n_out += len(o.delta_token_ids)
                        lp = tr.chat_logprobs(o.delta_token_ids, o.delta_logprobs, k) if o.delta_token_ids else None
                        if o.delta_text or lp is not None:
                            content.append(ChatStreamChoice(index=o.index, delta=DeltaMessage(content=o.delta_text),
                                                            logprobs=lp))
                        if o.finish_reason is not None:
                            finished.append(ChatStreamChoice(index=o.index, delta=DeltaMessage(),
                                                             finish_reason=o.finish_reason))
                    if content:
                        yield chunk(content)
                    if finished:
                        yield chunk(finished)
                if include_usage:
                    yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=n_out,
                                              total_tokens=n_prompt + n_out))
                yield "data: [DONE]\n\n"

            return _AbortingStream(_sse_guard(gen()), lambda: [async_engine.abort(r) for r in rids])

        final = None
        async for _, ro in results(raw, out, rids, stream=False):
            if ro.finished:
                final = ro
        if final is None:  # client went away
            return JSONResponse({}, status_code=499)
        choices = [ChatChoice(index=o.index, message=AssistantMessage(content=o.text),
                              logprobs=tr.chat_logprobs(o.token_ids, o.logprobs, k), finish_reason=o.finish_reason)
                   for o in sorted(final.outputs, key=lambda o: o.index)]
        n_out = sum(len(o.token_ids) for o in final.outputs)
        return ChatCompletionResponse(id=http_id, created=created, model=served_model_name, choices=choices,
                                      usage=UsageInfo(prompt_tokens=n_prompt, completion_tokens=n_out,
                                                      total_tokens=n_prompt + n_out))

    return app


# ============================================================================ /metrics
def render_metrics(ae: AsyncEngine) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    s, m = ae.stats, ae.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float, labels: str = "") -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{labels} {value}")

    metric("lmstack_num_requests_running", "gauge", "Sequences currently scheduled (running).", s.num_running)
    metric("lmstack_num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", s.num_waiting)
    metric("lmstack_kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0-1).", s.kv_cache_usage)
    metric("lmstack_kv_cache_blocks_used", "gauge", "KV-cache blocks in use.", s.kv_blocks_used)
    metric("lmstack_kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", s.kv_blocks_total)
    metric("lmstack_prefix_cache_hit_rate", "gauge", "Fraction of looked-up prompt tokens served from the prefix "
           "cache.", s.prefix_cache_hit_rate)
    metric("lmstack_num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.", s.num_preemptions)
    metric("lmstack_prompt_tokens_total", "counter", "Prompt tokens computed (prefix-cache hits excluded).",
           s.num_prompt_tokens)
    metric("lmstack_generation_tokens_total", "counter", "Tokens generated.", s.num_generated_tokens)
    lines.append("# HELP lmstack_request_success_total Requests finished, by finish reason.")
    lines.append("# TYPE lmstack_request_success_total counter")
    for reason in sorted(set(m.finished) | {"stop", "length", "abort"}):
        lines.append(f'lmstack_request_success_total{{finished_reason="{reason}"}} {m.finished[reason]}')
    name = "lmstack_time_to_first_token_seconds"
    lines.append(f"# HELP {name} Time from request arrival to its first generated token.")
    lines.append(f"# TYPE {name} histogram")
    for b, c in zip(TTFT_BUCKETS, m.ttft_buckets):
        lines.append(f'{name}_bucket{{le="{b}"}} {c}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {m.ttft_count}')
    lines.append(f"{name}_sum {m.ttft_sum}")
    lines.append(f"{name}_count {m.ttft_count}")
    return "\n".join(lines) + "\n"


# ============================================================================ CLI
def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by `serve` and `chat`."""
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has native bf16, else fp32) | float32 | bfloat16 | float16")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (overrides memory)")
    p.add_argument("--kv-cache-memory", type=float, default=None, help="KV pool size in GiB")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--max-model-len", type=int, default=None)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = dict(dtype=args.dtype, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              enable_prefix_caching=not args.no_prefix_caching,
                              enable_chunked_prefill=not args.no_chunked_prefill, max_model_len=args.max_model_len)
    if args.kv_cache_memory is not None:
        if args.kv_cache_memory <= 0:
            raise ValueError(f"--kv-cache-memory must be > 0 GiB, got {args.kv_cache_memory}")
        kw["kv_cache_memory"] = int(args.kv_cache_memory * 2**30)
    return kw


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a model over an OpenAI-compatible HTTP API. --model is an HF "
                              "folder or a .gguf file (weights, tokenizer and chat template all come from the file).")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: the folder name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import torch
    import uvicorn

    from lmstack.engine.llm import LLM

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    llm = LLM(args.model, **engine_kwargs(args))
    name = args.served_model_name or Path(args.model).resolve().name
    app = build_app(llm, name, api_key=args.api_key, max_model_len=llm.max_model_len)
    logger.info("serving %s as %r on http://%s:%d/v1 (max_model_len %d)", args.model, name, args.host, args.port,
                llm.max_model_len)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
