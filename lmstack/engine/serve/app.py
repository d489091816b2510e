"""The FastAPI app: error handlers in OpenAI's shape, the small routes (/health, /v1/models, /metrics,
vLLM's /tokenize, /detokenize and /tokenizer_info), and the completion routes from completions.py and
chat.py. `app.state.async_engine` is the engine driver (its thread starts with the app or the first
request)."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.engine.serve import chat, completions
from lmstack.engine.serve.async_engine import AsyncEngine
from lmstack.engine.serve.context import ServeContext
from lmstack.engine.serve.limits import Limits, RequestGuard
from lmstack.engine.serve.metrics import render_metrics
from lmstack.engine.serve.protocol import (DetokenizeRequest, ModelCard, ModelList, ProtocolError, TokenizeRequest,
                                           TokenizeResponse, random_id)
from lmstack.engine.serve.translate import APIError, error_response, validation_message
from lmstack.log import logger


def build_app(engine: Any, served_model_name: str, api_key: str | None = None, max_model_len: int | None = None,
              tool_call_parser: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (an `LLM`) under the model name `served_model_name`."""
    async_engine = AsyncEngine(engine)
    limits = limits or Limits()
    ctx = ServeContext(engine, async_engine, served_model_name, int(max_model_len or engine.max_model_len),
                       api_key, tool_call_parser, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        async_engine.shutdown()

    app = FastAPI(title="lmstack", lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.served_model_name = served_model_name
    app.add_middleware(RequestGuard, limits=limits, api_key=api_key)

    # ---------------------------------------------------------------- errors in OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(ProtocolError)
    async def _protocol_error(_: Request, e: ProtocolError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI says 422; OpenAI clients expect 400 with the error object.
        msg, param = validation_message(e)
        return error_response(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        # the details go to the log, not to the client (they can name files and internals)
        rid = random_id("err")
        logger.exception("internal server error %s", rid)
        return error_response(500, f"internal server error (id {rid}; the details are in the server log)",
                              type="internal_server_error")

    # ---------------------------------------------------------------- small routes
    @app.get("/health")
    async def health() -> JSONResponse:
        if not async_engine.alive:
            return error_response(503, f"engine stopped: {async_engine.error!r}", type="server_error")
        return JSONResponse({"status": "ok"})

    def card() -> ModelCard:
        return ModelCard(id=served_model_name, max_model_len=ctx.max_len)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        ctx.check_model(model_id)
        return card()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(async_engine), media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- vLLM's tokenizer routes
    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await ctx.tokenize(req.prompt, add_special_tokens=add)
        else:
            msgs = [m.model_dump(exclude_none=True) for m in req.messages]
            text = await ctx.render_chat(msgs, add_generation_prompt=req.add_generation_prompt, tools=req.tools,
                                         **(req.chat_template_kwargs or {}))
            ids = await ctx.tokenize(text, add_special_tokens=bool(req.add_special_tokens), param="messages")
        strs = None
        if req.return_token_strs:
            strs = [ctx.tokenizer.id_to_token(t) or "" for t in ids]
        return TokenizeResponse(count=len(ids), max_model_len=ctx.max_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        ctx.check_model(req.model)
        ctx.check_token_ids(req.tokens, "tokens")
        if ctx.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="tokens")
        return JSONResponse({"prompt": await ctx.off_loop(ctx.tokenizer.decode, req.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        """What lm-eval's remote tokenizer reads (its special tokens and chat template), as vLLM answers."""
        tok = ctx.tokenizer
        if tok is None:
            raise APIError(404, "this model has no tokenizer", code="not_found")
        template = tok.chat_template if isinstance(tok.chat_template, (str, type(None))) else \
            tok.chat_template.get("default")
        return JSONResponse({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
                             "bos_token": tok.bos_token, "pad_token": tok.pad_token, "chat_template": template,
                             "model_max_length": ctx.max_len, "vocab_size": ctx.vocab_size})

    completions.register(app, ctx)
    chat.register(app, ctx)
    return app
