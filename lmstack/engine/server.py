"""`lmstack serve --model DIR`: the OpenAI-compatible HTTP server's command line.

The server itself is lmstack/engine/serve/: the engine thread (async_engine.py), the app and its
small routes (app.py), the completion routes (completions.py, chat.py), the OpenAI shapes
(protocol.py) and the translation between them and engine outputs (translate.py).
"""
from __future__ import annotations

import argparse
from typing import Any

from lmstack.engine.serve.app import build_app
from lmstack.engine.serve.limits import Limits, header_timeout_protocol
from lmstack.engine.tool_parsers import PARSERS
from lmstack.log import logger

__all__ = ["add_engine_args", "add_parser", "build_app", "engine_kwargs", "run"]


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
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and tokenizer "
                   "routes (visible in the process list: prefer LMSTACK_API_KEY or --api-key-file)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    p.add_argument("--tool-call-parser", default=None, choices=PARSERS,
                   help="the tool-call format to parse replies with (default: the one the chat template shows)")
    p.add_argument("--max-request-bytes", type=int, default=32 * 2**20, help="largest request body (413 above)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="sequences that may wait beyond --max-num-seqs (429 with Retry-After above)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds a request may take (504 after)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive (408)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a new connection may take to send its request headers (then it is closed)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in requests (it is code the server runs; refused by default)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
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
    limits = Limits(max_request_bytes=args.max_request_bytes, body_timeout_s=args.body_timeout,
                    max_queued_requests=args.max_queued_requests, request_timeout_s=args.request_timeout,
                    trust_request_chat_template=args.trust_request_chat_template)
    api_key = read_api_key(args)
    llm = LLM(args.model, **engine_kwargs(args))
    name = args.served_model_name or Path(args.model).resolve().name
    app = build_app(llm, name, api_key=api_key, max_model_len=llm.max_model_len,
                    tool_call_parser=args.tool_call_parser, limits=limits)
    logger.info("serving %s as %r on http://%s:%d/v1 (max_model_len %d)", args.model, name, args.host, args.port,
                llm.max_model_len)
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, args.access_log, args.header_timeout))
    # an engine that cannot go on stops the server, and the exit status says so: a supervisor restarts it
    app.state.async_engine.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.async_engine.error is not None:
        logger.error("the engine stopped (%r); exiting with status 1", app.state.async_engine.error)
        return 1
    return 0


def uvicorn_config(app: Any, host: str, port: int, access_log: bool = False, header_timeout_s: float = 10.0) -> Any:
    """uvicorn's settings for `lmstack serve`: a deadline for request headers (limits.header_timeout_protocol),
    idle keep-alive connections closed after 5 s, the access log on request."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, access_log=access_log, timeout_keep_alive=5,
                          http=header_timeout_protocol(header_timeout_s),
                          log_level="info" if access_log else "warning")


def read_api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file's first line, else $LMSTACK_API_KEY (vLLM reads $VLLM_API_KEY)."""
    import os

    if args.api_key:
        return args.api_key
    if args.api_key_file:
        from pathlib import Path

        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: cannot read a key from it ({e})") from e
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the first line is empty")
        return key
    return os.environ.get("LMSTACK_API_KEY") or None
