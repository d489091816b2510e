"""POST /v1/completions: OpenAI's legacy completions, with vLLM's extras.

`echo` with `logprobs` returns the prompt's tokens and log-probs before the completion's (the first
prompt token's log-prob is null: nothing precedes it); with `max_tokens=0` only the prompt is scored.
That is the request lm-evaluation-harness sends for log-likelihood (multiple-choice) tasks.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lmstack.engine.serve.context import ServeContext
from lmstack.engine.serve.protocol import (CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse,
                                           UsageInfo, random_id)
from lmstack.engine.serve.translate import AbortingStream, Translator, join_logprobs, sse, sse_guard


def register(app: FastAPI, ctx: ServeContext) -> None:
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        ctx.check(raw, req.model)
        prompts: list[list[int]] = []
        texts: list[str] = []
        for p in req.prompts():
            if isinstance(p, str):
                ids = await ctx.tokenize(p, add_special_tokens=True)
                texts.append(p)
            else:
                ctx.check_token_ids(p, "prompt")
                ids = list(p)
                texts.append(await ctx.off_loop(ctx.tokenizer.decode, ids)
                             if (req.echo and ctx.tokenizer is not None) else "")
            ctx.budget(len(ids), req.max_tokens, "prompt", allow_zero=req.echo)
            prompts.append(ids)
        params = [req.to_sampling_params(req.max_tokens, ctx.vocab_size) for _ in prompts]
        http_id = random_id("cmpl")
        created = int(time.time())
        out: asyncio.Queue = asyncio.Queue()
        rids = await ctx.submit(http_id, prompts, params, out)
        n = req.n
        k = req.logprobs or 0
        tr = Translator(ctx.tokenizer)
        n_prompt = sum(len(p) for p in prompts)
        name = ctx.served_model_name

        def prompt_part(key: int, ro: Any) -> tuple[str, Any, int]:
            """Echo: the prompt's text, its log-prob block (when asked) and the text offset after it."""
            if not req.echo:
                return "", None, 0
            if req.logprobs is None or ro.prompt_logprobs is None:
                return texts[key], None, 0
            lp, off = tr.completion_logprobs(prompts[key], ro.prompt_logprobs, k, 0)
            return texts[key], lp, off

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def gen() -> AsyncIterator[str]:
                offsets: dict[int, int] = {}
                n_out = 0
                async for key, ro in ctx.results(raw, out, rids, stream=True):
                    choices = []
                    for o in ro.outputs:
                        idx = key * n + o.index
                        text, lp0 = o.delta_text, None
                        if idx not in offsets:  # this choice's first chunk carries the echoed prompt
                            echo_text, lp0, offsets[idx] = prompt_part(key, ro)
                            text = echo_text + text
                        n_out += len(o.delta_token_ids)
                        if not text and not o.delta_token_ids and o.finish_reason is None and lp0 is None:
                            continue
                        lp, offsets[idx] = tr.completion_logprobs(o.delta_token_ids, o.delta_logprobs, k,
                                                                  offsets[idx])
                        choices.append(CompletionChoice(index=idx, text=text, logprobs=join_logprobs(lp0, lp),
                                                        finish_reason=o.finish_reason))
                    if choices:
                        yield sse(CompletionChunk(id=http_id, created=created, model=name, choices=choices))
                if include_usage:
                    usage = UsageInfo(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)
                    yield sse(CompletionChunk(id=http_id, created=created, model=name, choices=[], usage=usage))
                yield "data: [DONE]\n\n"

            return AbortingStream(sse_guard(gen()), lambda: ctx.abort_all(rids))

        final: dict[int, Any] = {}
        async for key, ro in ctx.results(raw, out, rids, stream=False):
            if ro.finished:
                final[key] = ro
        if len(final) < len(rids):  # client went away
            return JSONResponse({}, status_code=499)
        choices = []
        n_out = 0
        for key in range(len(rids)):
            ro = final[key]
            for o in ro.outputs:
                echo_text, lp0, off = prompt_part(key, ro)
                lp, _ = tr.completion_logprobs(o.token_ids, o.logprobs, k, off)
                choices.append(CompletionChoice(index=key * n + o.index, text=echo_text + o.text,
                                                logprobs=join_logprobs(lp0, lp), finish_reason=o.finish_reason))
                n_out += len(o.token_ids)
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=http_id, created=created, model=name, choices=choices,
                                  usage=UsageInfo(prompt_tokens=n_prompt, completion_tokens=n_out,
                                                  total_tokens=n_prompt + n_out))
