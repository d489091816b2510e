"""POST /v1/chat/completions: chat templating, tool calls and structured output.

Tools: `tools` go to the chat template (HF templates take `tools=`); with tool_choice "auto" the reply
is parsed for calls in the family's format (`--tool-call-parser`, else the one the template implies);
"required" and a named function are enforced by constrained decoding in that same format
(engine/tool_choice.py), so the parser reads the reply whatever tool_choice was; "none" leaves the
reply as text. Parsed calls become OpenAI `tool_calls` (streamed as OpenAI streams them: the call's
id and name first, then argument deltas) and finish_reason "tool_calls".
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lmstack.engine.serve.context import ServeContext
from lmstack.engine.serve.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                           ChatCompletionResponse, ChatStreamChoice, DeltaMessage, ProtocolError,
                                           UsageInfo, random_id)
from lmstack.engine.serve.translate import AbortingStream, APIError, Translator, sse, sse_guard
from lmstack.engine.tool_choice import ToolChoiceError, chosen_tools, tool_choice_constraint, tool_names
from lmstack.engine.tool_parsers import ToolParser, get_tool_parser, parser_name_for_template

# the markers of each format that may be single tokens of the vocabulary
_MARKERS = {"hermes": ("<tool_call>", "</tool_call>"), "mistral": ("[TOOL_CALLS]", "[ARGS]"),
            "llama3_json": (), "llama4_json": ()}


@dataclass
class ToolUse:
    parser: ToolParser
    parser_name: str
    special_ids: dict[str, int]  # the format's markers that are tokens of the vocabulary


def tool_use(ctx: ServeContext, req: ChatCompletionRequest) -> ToolUse | None:
    """Validate tools / tool_choice; the parser to read the reply with (None: plain text)."""
    try:
        tool_names(req.tools)
    except ToolChoiceError as e:
        raise ProtocolError(str(e), param="tools") from e
    if req.tool_choice not in (None, "none", "auto") and not req.tools:
        raise ProtocolError("tool_choice was given without tools", param="tool_choice")
    try:
        chosen_tools(req.tools, req.tool_choice)  # an unknown function name, a bad shape: 400
    except ToolChoiceError as e:
        raise ProtocolError(str(e), param="tool_choice") from e
    if not req.tools or req.tool_choice == "none":
        return None
    name = ctx.tool_call_parser
    if name is None:
        try:
            name = parser_name_for_template(ctx.tokenizer.get_chat_template(None, req.tools))
        except Exception:
            name = None
    if name is None:
        raise ProtocolError("this model's chat template shows no tool-call format; start the server with "
                            "--tool-call-parser (hermes, llama3_json, llama4_json or mistral)", param="tools")
    tok = ctx.tokenizer
    special = {m: i for m in _MARKERS.get(name, ()) if (i := tok.token_to_id(m)) is not None}
    return ToolUse(get_tool_parser(name), name, special)


def register(app: FastAPI, ctx: ServeContext) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        ctx.check(raw, req.model)
        if ctx.tokenizer is None:
            raise APIError(400, "this model has no tokenizer / chat template", param="messages")
        tools = tool_use(ctx, req)
        extra: dict[str, Any] = {}
        if tools is not None:
            try:
                ws = not req.constraint_options().get("disable_any_whitespace", False)
                # a named function is called once (as OpenAI and vLLM do); "required" may call several
                parallel = req.parallel_tool_calls and req.tool_choice == "required"
                forced = tool_choice_constraint(tools.parser_name, req.tools, req.tool_choice, parallel,
                                                tools.special_ids, any_whitespace=ws)
            except ToolChoiceError as e:
                raise ProtocolError(str(e), param="tool_choice") from e
            if forced is not None:
                if not req.constraint_options() and req.constraint() is not None:
                    raise ProtocolError("tool_choice 'required' or a named function already constrains the "
                                        "output; drop response_format / structured_outputs", param="tool_choice")
                extra["structured_outputs"] = forced
            if tools.special_ids:  # the markers must survive detokenization for the parser to see them
                extra["skip_special_tokens"] = False
        kwargs = dict(req.chat_template_kwargs or {})
        if req.chat_template is not None:
            kwargs["chat_template"] = req.chat_template
        text = await ctx.render_chat(req.template_messages(), add_generation_prompt=req.add_generation_prompt,
                                     tools=req.tools, **kwargs)
        ids = await ctx.tokenize(text, add_special_tokens=False, param="messages")  # the template wrote BOS
        max_tokens = ctx.budget(len(ids), req.requested_max_tokens(), "messages")
        params = req.to_sampling_params(max_tokens, ctx.vocab_size, **extra)
        http_id = random_id("chatcmpl")
        created = int(time.time())
        out: asyncio.Queue = asyncio.Queue()
        rids = await ctx.submit(http_id, [ids], [params], out)
        k = req.top_logprobs or 0
        tr = Translator(ctx.tokenizer)
        n_prompt = len(ids)
        name = ctx.served_model_name

        def finish_reason(reason: str | None, called: bool) -> str | None:
            return "tool_calls" if called and reason == "stop" else reason

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            streams = {i: tools.parser.stream() for i in range(req.n)} if tools is not None else {}

            def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
                return sse(ChatCompletionChunk(id=http_id, created=created, model=name, choices=choices, usage=usage))

            async def gen() -> AsyncIterator[str]:
                # OpenAI sends the role first, then content deltas, then an empty delta with finish_reason.
                yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                             for i in range(req.n)])
                n_out = 0
                async for _, ro in ctx.results(raw, out, rids, stream=True):
                    content, finished = [], []
                    for o in ro.outputs:
                        n_out += len(o.delta_token_ids)
                        lp = tr.chat_logprobs(o.delta_token_ids, o.delta_logprobs, k) if o.delta_token_ids else None
                        if o.index in streams:
                            ts = streams[o.index]
                            deltas = ts.feed(o.delta_text) + (ts.finish() if o.finish_reason is not None else [])
                        else:
                            deltas = [{"content": o.delta_text}] if o.delta_text else []
                        if not deltas and lp is not None:
                            deltas = [{"content": ""}]
                        for j, d in enumerate(deltas):
                            content.append(ChatStreamChoice(index=o.index, delta=DeltaMessage(**d),
                                                            logprobs=lp if j == 0 else None))
                        if o.finish_reason is not None:
                            called = o.index in streams and bool(streams[o.index].ids)
                            finished.append(ChatStreamChoice(index=o.index, delta=DeltaMessage(),
                                                             finish_reason=finish_reason(o.finish_reason, called)))
                    if content:
                        yield chunk(content)
                    if finished:
                        yield chunk(finished)
                if include_usage:
                    yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=n_out,
                                              total_tokens=n_prompt + n_out))
                yield "data: [DONE]\n\n"

            return AbortingStream(sse_guard(gen()), lambda: ctx.abort_all(rids))

        final = None
        async for _, ro in ctx.results(raw, out, rids, stream=False):
            if ro.finished:
                final = ro
        if final is None:  # client went away
            return JSONResponse({}, status_code=499)
        choices = []
        for o in sorted(final.outputs, key=lambda o: o.index):
            content, calls = tools.parser.parse(o.text) if tools is not None else (o.text, [])
            msg = AssistantMessage(content=content, tool_calls=[c.to_openai() for c in calls] or None)
            choices.append(ChatChoice(index=o.index, message=msg, logprobs=tr.chat_logprobs(o.token_ids, o.logprobs, k),
                                      finish_reason=finish_reason(o.finish_reason, bool(calls))))
        n_out = sum(len(o.token_ids) for o in final.outputs)
        return ChatCompletionResponse(id=http_id, created=created, model=name, choices=choices,
                                      usage=UsageInfo(prompt_tokens=n_prompt, completion_tokens=n_out,
                                                      total_tokens=n_prompt + n_out))
