"""The constraint `tool_choice` = "required" or a named function imposes, in the model family's format.

vLLM forces such calls as a bare JSON array of {name, parameters} and builds the tool calls itself.
Here the output is forced into the format the chat template taught the model (hermes' `<tool_call>`
blocks, Llama 3's JSON, Mistral's `[TOOL_CALLS]`), so the model stays on its own distribution and the
same tool parser reads the reply whatever tool_choice was. The constraint is a Lark grammar (llguidance's
dialect: `%json {...}` embeds each tool's parameter schema; `<[id]>` matches a special token by id),
given to the engine as StructuredOutputsParams(grammar=...).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from lmstack.engine.structured.params import StructuredOutputsParams


class ToolChoiceError(ValueError):
    """tools / tool_choice that cannot be honoured; the message names the field (a 400 for the server)."""


def tool_names(tools: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The function names of OpenAI `tools`, validated (each {"type": "function", "function": {"name", ...}})."""
    names = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise ToolChoiceError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolChoiceError(f"tools[{i}].function.name must be a non-empty string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ToolChoiceError(f"tools[{i}].function.parameters must be a JSON schema object")
        names.append(name)
    return names


def chosen_tools(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any) -> list[Mapping[str, Any]] | None:
    """The tools a call must be made to (None: the model may answer in text, i.e. "auto" / "none")."""
    names = tool_names(tools)
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        if not names:
            raise ToolChoiceError("tool_choice is 'required' but no tools were given")
        return list(tools or [])
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise ToolChoiceError(f"tool_choice names function {name!r}, which is not in tools "
                                  f"({', '.join(names) or 'none given'})")
        return [t for t in tools or [] if t["function"]["name"] == name]
    raise ToolChoiceError(f"tool_choice must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                          f"\"function\": {{\"name\": ...}}}}, got {tool_choice!r}")


def _params(tool: Mapping[str, Any]) -> dict:
    return dict(tool["function"].get("parameters") or {"type": "object", "properties": {}})


def _call_schema(tools: Sequence[Mapping[str, Any]], args_key: str) -> dict:
    one = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, args_key: _params(t)},
            "required": ["name", args_key], "additionalProperties": False} for t in tools]
    return one[0] if len(one) == 1 else {"anyOf": one}


def tool_choice_constraint(parser: str, tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any,
                           parallel_tool_calls: bool = True,
                           special_token_ids: Mapping[str, int] | None = None,
                           any_whitespace: bool = True) -> StructuredOutputsParams | None:
    """The grammar that forces one call (or, with parallel_tool_calls, one or more) to the chosen tools in
    `parser`'s format (hermes, llama3_json / llama4_json, mistral); None for "auto" / "none".
    `special_token_ids`: the tokenizer's special tokens (content -> id); a format marker that is one
    (e.g. Mistral's [TOOL_CALLS]) is matched as that token, otherwise as text. any_whitespace=False:
    the JSON has no whitespace between tokens (vLLM's disable_any_whitespace)."""
    chosen = chosen_tools(tools, tool_choice)
    if chosen is None:
        return None
    special = special_token_ids or {}

    def js(schema: dict) -> str:  # a %json body; llguidance reads its options from "x-guidance"
        return json.dumps(schema if any_whitespace else {"x-guidance": {"whitespace_flexible": False}, **schema})

    def lit(s: str) -> str:  # a marker: its special token if it is one, else the literal text
        return f"<[{special[s]}]>" if s in special else json.dumps(s)

    def more(sep: str, item: str) -> str:  # the further calls parallel_tool_calls allows
        return f" ({sep} {item})*" if parallel_tool_calls else ""

    if parser == "hermes":
        body = js(_call_schema(chosen, "arguments"))
        lark = (f'start: call{more(json.dumps(chr(10)), "call")}\n'
                f'call: {lit("<tool_call>")} "\\n" body "\\n" {lit("</tool_call>")}\nbody: %json {body}\n')
    elif parser in ("llama3_json", "llama4_json"):
        lark = f'start: body{more(json.dumps("; "), "body")}\nbody: %json {js(_call_schema(chosen, "parameters"))}\n'
    elif parser == "mistral":
        if "[ARGS]" in special:  # v11+ tokenizers: [TOOL_CALLS]name[ARGS]{...} per call
            alts = " | ".join(f'{json.dumps(t["function"]["name"])} {lit("[ARGS]")} args{i}'
                              for i, t in enumerate(chosen))
            rules = "".join(f"args{i}: %json {js(_params(t))}\n" for i, t in enumerate(chosen))
            lark = f"start: call{more('', 'call')}\ncall: {lit('[TOOL_CALLS]')} ({alts})\n{rules}"
        else:
            body = js(_call_schema(chosen, "arguments"))
            lark = f'start: {lit("[TOOL_CALLS]")} "[" body{more(json.dumps(", "), "body")} "]"\nbody: %json {body}\n'
    else:
        raise ToolChoiceError(f"no tool-call format for parser {parser!r}")
    return StructuredOutputsParams(grammar=lark)
