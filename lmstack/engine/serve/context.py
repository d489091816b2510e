"""What every route shares: the engine driver, the tokenizer, the checks run before any work, and the
plumbing from engine outputs back to a handler.

Tokenizing and chat templating are CPU work: they run in worker threads (`off_loop`), never on the
event loop, so a huge or hostile prompt slows its own request, not /health or the other streams.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Request

from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.serve.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from lmstack.engine.serve.limits import Limits
from lmstack.engine.serve.translate import APIError

T = TypeVar("T")
DISCONNECT_POLL = 0.25  # seconds between disconnect checks of a non-streaming request


@dataclass
class ServeContext:
    engine: Any  # the LLM
    async_engine: AsyncEngine
    served_model_name: str
    max_len: int
    api_key: str | None = None
    tool_call_parser: str | None = None  # --tool-call-parser; None: chosen from the chat template
    limits: Limits = field(default_factory=Limits)
    _open: dict[str, int] = field(default_factory=dict)  # engine request id -> its n, until it finishes
    open_sequences: int = 0  # sum of _open: what admission control counts

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    # ---------------------------------------------------------------- checks before any work
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.served_model_name}`.",
                           param="model", code="model_not_found")

    def check_alive(self) -> None:
        if not self.async_engine.alive:
            raise APIError(503, f"the engine has stopped: {self.async_engine.error!r}", type="server_error")

    def check(self, raw: Request, model: str | None) -> None:
        """(The API key was checked by limits.RequestGuard before the body was read.)"""
        self.check_model(model)
        self.check_alive()

    def budget(self, prompt_len: int, requested: int | None, what: str, allow_zero: bool = False) -> int | None:
        """Validate the context budget before any work; returns max_tokens for the engine."""
        least = 0 if allow_zero else 1
        if requested is not None and requested < least:
            raise APIError(400, f"max_tokens must be at least {least}, got {requested}", param="max_tokens")
        if prompt_len == 0:
            raise APIError(400, f"the {what} is empty (0 tokens)", param="prompt" if what == "prompt" else "messages")
        total = prompt_len + (requested or 0)
        if prompt_len >= self.max_len or total > self.max_len:
            msg = (f"This model's maximum context length is {self.max_len} tokens. However, you requested {total} "
                   f"tokens ({prompt_len} in the {what}, {requested or 0} in the completion). "
                   f"Please reduce the length of the {what} or completion.")
            raise APIError(400, msg, param="messages" if what == "messages" else "prompt",
                           code="context_length_exceeded")
        return requested

    # ---------------------------------------------------------------- CPU work off the event loop
    @staticmethod
    async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _need_tokenizer(self, param: str) -> Any:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send prompts as token ids", param=param)
        return self.tokenizer

    async def tokenize(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        tok = self._need_tokenizer(param)
        try:
            return await self.off_loop(tok.encode, text, add_special_tokens=add_special_tokens)
        except TypeError as e:  # the tokenizer refuses the text (a lone surrogate such as "\ud800")
            raise APIError(400, f"{param} is not valid Unicode text (it holds a lone surrogate?)", param=param) from e

    async def render_chat(self, messages: list[dict], param: str = "messages", chat_template: str | None = None,
                          **kwargs: Any) -> str:
        tok = self._need_tokenizer(param)
        if chat_template is not None and not self.limits.trust_request_chat_template:
            raise APIError(400, "a chat_template in the request is refused: it is code the server would run; "
                           "start the server with --trust-request-chat-template to allow it", param="chat_template")
        try:
            # the wait is bounded; a worker thread cannot be stopped, so a template that loops without
            # output keeps one busy (the model's own template, or one trusted by flag, never comes from a client)
            return await asyncio.wait_for(self.off_loop(
                tok.apply_chat_template, messages, tokenize=False, chat_template=chat_template,
                max_chars=self.limits.max_template_chars, **kwargs), timeout=self.limits.template_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(400, f"the chat template took longer than {self.limits.template_timeout_s} s to render",
                           param=param) from None
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"could not apply the chat template: {e}", param=param) from e

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param} token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)

    # ---------------------------------------------------------------- to the engine and back
    async def submit(self, http_id: str, prompts: list[list[int]], params: list[SamplingParams],
                     out: asyncio.Queue) -> list[str]:
        capacity = self.engine.scheduler.max_num_seqs + self.limits.max_queued_requests
        want = sum(sp.n for sp in params)
        if self.open_sequences + want > capacity:
            raise APIError(429, f"the server is at capacity ({self.open_sequences} sequences running or queued, "
                           f"limit {capacity}: --max-num-seqs + --max-queued-requests); retry shortly",
                           type="rate_limit_error", code="server_overloaded", headers={"Retry-After": "1"})
        rids = []
        try:
            for i, (ids, sp) in enumerate(zip(prompts, params)):
                rid = f"{http_id}-{i}"
                rids.append(rid)
                await self.async_engine.add(rid, ids, sp, out, key=i)
                self._open[rid] = sp.n
                self.open_sequences += sp.n
        except BaseException as e:
            for rid in rids:
                self.async_engine.abort(rid)
                self._closed(rid)
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e), type="server_error") from e
            if isinstance(e, ValueError):  # the engine refused it (e.g. does not fit the KV pool, bad grammar)
                raise APIError(400, str(e)) from e
            raise
        return rids

    def _closed(self, rid: str) -> None:
        self.open_sequences -= self._open.pop(rid, 0)

    def abort_all(self, rids: list[str]) -> None:
        for r in rids:
            self.async_engine.abort(r)
            self._closed(r)

    async def results(self, raw: Request, out: asyncio.Queue, rids: list[str], stream: bool) -> AsyncIterator[Any]:
        """Yield (prompt index, RequestOutput) until every request finished; abort leftovers on exit."""
        pending = set(range(len(rids)))
        loop = asyncio.get_running_loop()
        checked = loop.time()
        timeout = self.limits.request_timeout_s
        deadline = None if timeout is None else loop.time() + timeout

        try:
            if not stream and await raw.is_disconnected():  # gave up while we were queueing it
                return
            while pending:
                if deadline is not None and loop.time() > deadline:
                    raise APIError(504, f"the request ran longer than --request-timeout ({timeout} s) and was "
                                   "stopped", type="timeout_error", code="request_timeout")
                if stream:  # a disconnect cancels the streaming task (and AbortingStream aborts)
                    try:
                        key, item = await asyncio.wait_for(out.get(), None if deadline is None
                                                           else max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        continue
                else:
                    # Non-streaming handlers are not cancelled when the client leaves: look ourselves,
                    # every DISCONNECT_POLL seconds whether or not outputs are arriving.
                    try:
                        key, item = await asyncio.wait_for(out.get(), timeout=DISCONNECT_POLL)
                    except asyncio.TimeoutError:
                        key, item = None, None
                    if loop.time() - checked >= DISCONNECT_POLL:
                        checked = loop.time()
                        if await raw.is_disconnected():
                            return
                    if item is None:
                        continue
                if isinstance(item, EngineStepError):
                    raise APIError(500, str(item), type="server_error")
                if isinstance(item, BaseException):
                    raise APIError(500, f"the engine stopped: {type(item).__name__}", type="server_error")
                if item.error is not None:  # the engine stopped this request alone (details in its log)
                    raise APIError(500, f"the engine failed on this request ({item.request_id}; the details are "
                                   "in the server log); other requests were not affected", type="server_error")
                if item.finished:
                    pending.discard(key)
                    self._closed(rids[key])
                yield key, item
        finally:
            for k in pending:
                self.async_engine.abort(rids[k])
                self._closed(rids[k])
