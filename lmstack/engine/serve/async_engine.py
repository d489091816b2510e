"""The engine thread: one thread owns the `LLM` and is the only code that calls `add_request`, `step`
and `abort`, so the engine needs no locks. The asyncio side hands it commands through a queue and
reads each request's RequestOutputs back from an asyncio.Queue (filled with `call_soon_threadsafe`).

A step that raises fails the requests that were in flight (each gets the error on its queue, its KV
blocks are freed) and the thread goes on serving: one bad request or one engine bug costs the requests
it touched, not the service. Only MAX_CONSECUTIVE_FAILURES failed steps in a row (a broken engine,
not a bad request) stop it; then /health and every route answer 503.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from lmstack.engine.sampling_params import SamplingParams
from lmstack.log import logger
from lmstack.malloc import release_freed_memory

# Prometheus histogram buckets for time to first token, in seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_CONSECUTIVE_FAILURES = 3


class EngineStepError(RuntimeError):
    """What a request in flight receives when an engine step failed under it."""


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
        self.on_fatal: Callable[[], None] | None = None  # called (on the engine thread) when it stops for good

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
        failures = 0
        busy = False
        try:
            while not self._stop.is_set():
                if not eng.has_unfinished_requests():
                    if busy:  # going idle: hand the heap's free pages back (see lmstack/malloc.py)
                        release_freed_memory()
                        busy = False
                    self._handle(self._inbox.get())  # idle: sleep until a command arrives
                busy = True
                while True:  # between steps: take whatever else has arrived, without waiting
                    try:
                        self._handle(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if self._stop.is_set():
                    break
                # step() also reports aborted requests; with nothing left to run it just returns them
                # (so aborts never pile up while idle).
                try:
                    outs = eng.step()
                except Exception as e:
                    failures += 1
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        raise
                    self._fail_in_flight(e)
                    continue
                failures = 0
                self._deliver(outs)
                self.stats = eng.get_stats()
        except BaseException as e:  # the engine itself is broken: fail every open request loudly
            logger.exception("engine thread failed")
            self.error = e
            for stream in self._streams.values():
                self._post(stream.loop, stream.queue.put_nowait, (stream.key, e))
            self._streams.clear()
            if self.on_fatal is not None:
                self.on_fatal()

    def _fail_in_flight(self, e: Exception) -> None:
        """A step raised: every open request gets the error and is aborted (its KV blocks freed)."""
        logger.exception("engine step failed; failing the %d request(s) in flight", len(self._streams))
        err = EngineStepError(f"the engine step running this request failed: {type(e).__name__}: {e}")
        for rid, stream in self._streams.items():
            self.engine.abort(rid)
            self._post(stream.loop, stream.queue.put_nowait, (stream.key, err))
        self._streams.clear()
        self.engine.step()  # reports the aborts (nothing is left to run), so the pool is whole again
        self.stats = self.engine.get_stats()
