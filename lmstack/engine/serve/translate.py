"""Between engine objects and OpenAI's wire format: errors in OpenAI's shape, server-sent events, and
engine log-probs as the two OpenAI log-prob layouts (chat's list of tokens, completions' parallel lists)."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from lmstack.engine.serve.protocol import (ChatLogprobs, ChatLogprobToken, CompletionLogProbs, ErrorInfo,
                                           ErrorResponse, TopLogprob)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_body(status: int, message: str, type: str = "invalid_request_error", code: str | None = None) -> bytes:
    """The same error as raw JSON bytes (for ASGI middleware, below FastAPI)."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type, code=code)).model_dump_json().encode()


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
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




def sse(obj: Any) -> str:
    payload = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {payload}\n\n"


async def sse_guard(gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """After the 200 and its headers are sent, an error can only travel as an event (as OpenAI does)."""
    try:
        async for piece in gen:
            yield piece
    except APIError as e:
        yield sse(ErrorResponse(error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code)))
        yield "data: [DONE]\n\n"


class AbortingStream(StreamingResponse):
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



class Translator:
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

    def completion_logprobs(self, token_ids: list[int], lps: list[dict | None] | None, k: int,
                            offset: int) -> tuple[CompletionLogProbs | None, int]:
        """Returns the logprobs block and the text offset after these tokens (a None entry: no log-prob)."""
        if lps is None:
            return None, offset
        out = CompletionLogProbs()
        for tid, lp in zip(token_ids, lps):
            if lp is None:  # the first prompt token: nothing precedes it, so OpenAI gives it null
                s = self.piece(tid)
                out.tokens.append(s)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                out.text_offset.append(offset)
                offset += len(s)
                continue
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




def join_logprobs(a: CompletionLogProbs | None, b: CompletionLogProbs | None) -> CompletionLogProbs | None:
    """The prompt's block followed by the completion's (echo with logprobs)."""
    if a is None or b is None:
        return a or b
    return CompletionLogProbs(text_offset=a.text_offset + b.text_offset, token_logprobs=a.token_logprobs + b.token_logprobs,
                              tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs + b.top_logprobs)
