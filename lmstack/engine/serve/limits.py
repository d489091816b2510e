"""What is checked below FastAPI, before a request's body is read or parsed: the API key (a client
without it is answered 401 without sending its body), the body's size (413; a declared Content-Length
up front, a chunked body as it arrives) and how long the body may take to arrive (408: a client that
sends half a request and waits holds no handler forever)."""
from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException

from lmstack.engine.serve.translate import error_body

# routes that need the API key (vLLM checks /v1; the tokenizer routes are lmstack's and vLLM's extras)
PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


@dataclass
class Limits:
    """The server's limits (`lmstack serve` flags)."""

    max_request_bytes: int = 32 * 2**20  # --max-request-bytes
    body_timeout_s: float = 30.0  # from the first byte of the body to its last
    max_queued_requests: int = 256  # --max-queued-requests: waiting beyond the running batch (then 429)
    request_timeout_s: float | None = None  # --request-timeout: a request's whole life (then 504)
    max_template_chars: int = 8 * 2**20  # what the chat template may produce for one request
    template_timeout_s: float = 10.0  # how long the client waits for its chat template to render
    trust_request_chat_template: bool = False  # --trust-request-chat-template

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "body_timeout_s", "max_queued_requests", "max_template_chars",
                     "template_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"Limits.request_timeout_s must be > 0 or None, got {self.request_timeout_s}")


class _Refused(HTTPException):
    """Raised from receive(): FastAPI passes an HTTPException from body reading through to its handler
    (anything else it would turn into a 400)."""


class RequestGuard:
    """ASGI middleware applying `Limits` and the API key before the app sees the request."""

    def __init__(self, app: Any, limits: Limits, api_key: str | None) -> None:
        self.app, self.limits, self.api_key = app, limits, api_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.api_key is not None and scope.get("path", "").startswith(PROTECTED) \
                and scope.get("method") != "OPTIONS" and not self._authorized(headers):
            return await _reply(send, 401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                                code="invalid_api_key")
        limit = self.limits.max_request_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reply(send, 413, f"the request body exceeds the limit of {limit} bytes",
                                code="request_too_large")
        seen = 0
        deadline: float | None = None
        loop = asyncio.get_running_loop()

        async def guarded_receive() -> Any:
            nonlocal seen, deadline
            if deadline is None:
                deadline = loop.time() + self.limits.body_timeout_s
            try:
                left = None if deadline == float("inf") else max(0.0, deadline - loop.time())
                msg = await asyncio.wait_for(receive(), timeout=left)
            except asyncio.TimeoutError:
                raise _Refused(408, f"the request body did not arrive within {self.limits.body_timeout_s} s") from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _Refused(413, f"the request body exceeds the limit of {limit} bytes")
                if not msg.get("more_body", False):
                    deadline = float("inf")  # the body is complete; later receives wait for a disconnect
            return msg

        await self.app(scope, guarded_receive, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


async def _reply(send: Any, status: int, message: str, code: str) -> None:
    body = error_body(status, message, code=code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's HTTP protocol class (the one it would pick) with a deadline for a new connection's first
    request headers: uvicorn has none, so a client that opens connections and sends half a header line
    would hold each forever. Past the deadline with no request started, the connection is closed."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderDeadline
