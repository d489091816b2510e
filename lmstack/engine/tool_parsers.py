"""Tool calls in model output -> OpenAI `tool_calls`, complete or streamed (pure functions, no engine state).

Families (parser names are vLLM's `--tool-call-parser` values):
  hermes       Qwen2.5 / Qwen3 / Hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
               one block per call; content = the text before the first block.
  llama3_json  Llama 3.1 / 3.2 (alias llama4_json): the whole reply is `{"name": ..., "parameters": {...}}`
               (or "arguments"), optionally after `<|python_tag|>`, several calls separated by `;`.
  mistral      `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (tokenizers before v11), or
               `[TOOL_CALLS]name[ARGS]{...}` per call (v11+; `[ARGS]` may be absent from the text);
               content = the text before the first `[TOOL_CALLS]`.
The markers `<|python_tag|>` and `[TOOL_CALLS]` are special tokens: decode with skip_special_tokens=False.

One partial parser per family reads the text so far and reports the content that is certain, and for
each call its name once complete and the raw JSON text of its arguments as far as it is certain.
`parse()` runs it on the whole text; `ToolCallStream.feed()` re-runs it on each new chunk and emits
what grew, as OpenAI streams it: a header delta (index, id, type, name, arguments "") and then argument
fragments. Arguments are the model's own JSON text (not re-serialized), so the streamed fragments of a
call always concatenate to the non-streamed `arguments`. As in vLLM, a completed reply whose tool-call
JSON is malformed has no tool calls and the whole text as content; text after the calls is dropped.
"""
from __future__ import annotations

import json
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

from lmstack.engine.partial_json import WS as _WS
from lmstack.engine.partial_json import PartialJSONError as ToolParseError
from lmstack.engine.partial_json import object_members, skip_ws, value_end

PARSERS = ("hermes", "llama3_json", "llama4_json", "mistral")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class _Partial:
    """One call as far as it is known: name (None until its string is complete), argument text."""
    name: str | None = None
    args: str = ""  # certain prefix of the arguments' JSON text
    done: bool = False  # the call is complete (args final)


def openai_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's make_tool_call_id


def mistral_call_id() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))  # Mistral: 9 alnum


def _call_object(s: str, i: int, final: bool, args_keys: Sequence[str]) -> tuple[_Partial, int | None]:
    """A `{"name": ..., <args key>: {...}}` object at s[i]: the partial call and the object's end."""
    members, end = object_members(s, i, final)
    call = _Partial()
    for key, v, e in members:
        if key == "name" and e is not None:
            name = json.loads(s[v:e])
            if not isinstance(name, str) or not name:
                raise ToolParseError("the tool name is not a string")
            call.name = name
        elif key in args_keys:
            if s[v] == '"':  # arguments given as a JSON string holding the JSON text
                call.args = json.loads(s[v:e]) if e is not None else ""
            elif s[v] == "{":
                call.args = s[v:e] if e is not None else s[v:]
            else:
                raise ToolParseError("the arguments are not a JSON object")
    if end is not None:
        if call.name is None:
            raise ToolParseError("a tool call has no name")
        call.args = call.args or "{}"
        json.loads(call.args)  # malformed arguments -> ToolParseError (json.JSONDecodeError is a ValueError)
        call.done = True
    return call, end


def _content_before(text: str, marker: str, final: bool) -> tuple[str | None, int]:
    """(the content before the first `marker` that is certain, the marker's index or -1). With the
    marker: the text before it, trailing whitespace dropped. Without: all of the text when final;
    otherwise less trailing whitespace and a suffix that could be the start of the marker."""
    first = text.find(marker)
    if first >= 0:
        return text[:first].rstrip(_WS) or None, first
    if final:
        return text, -1
    n = len(text)
    for k in range(min(len(marker) - 1, n), 0, -1):
        if marker.startswith(text[n - k:]):
            n -= k
            break
    return text[:n].rstrip(_WS), -1


# ------------------------------------------------------------------------------------------ families
class ToolParser:
    """Base: subclasses implement `_scan(text, final) -> (content or None, calls, in_tool_mode)`."""

    name = ""
    args_keys: Sequence[str] = ("arguments",)

    def __init__(self, id_factory: Callable[[], str] | None = None) -> None:
        self.new_id = id_factory or openai_call_id

    def _scan(self, text: str, final: bool) -> tuple[str | None, list[_Partial]]:
        raise NotImplementedError

    def _take(self, text: str, i: int, final: bool, calls: list[_Partial]) -> int | None:
        """Append the call object at text[i] to `calls`; its end (None while open)."""
        if text[i] != "{":
            raise ToolParseError(f"expected a tool-call JSON object at {i}")
        call, end = _call_object(text, i, final, self.args_keys)
        calls.append(call)
        return end

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A complete reply -> (content, tool calls). Malformed tool-call JSON: (text, [])."""
        try:
            content, calls = self._scan(text, final=True)
        except (ToolParseError, ValueError):
            return text, []
        if not calls:
            return content, []
        if not all(c.done for c in calls):
            return text, []
        return content, [ToolCall(self.new_id(), c.name, c.args) for c in calls]

    def stream(self) -> "ToolCallStream":
        return ToolCallStream(self)


class HermesParser(ToolParser):
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def _scan(self, text: str, final: bool) -> tuple[str | None, list[_Partial]]:
        content, first = _content_before(text, self.start, final)
        if first < 0:
            return content, []
        calls: list[_Partial] = []
        pos = first
        while pos >= 0:
            i = skip_ws(text, pos + len(self.start))
            if i >= len(text):
                break
            end = self._take(text, i, final, calls)
            if end is None:
                break
            close = skip_ws(text, end)
            if text.startswith(self.end, close):
                pos = text.find(self.start, close + len(self.end))
            elif final or len(text) - close >= len(self.end):
                if not (final and close >= len(text)):  # a reply cut before </tool_call> keeps its call
                    raise ToolParseError("expected </tool_call>")
                break
            else:
                break
        if final and not calls:
            raise ToolParseError("<tool_call> without a call")
        return content, calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    tag = "<|python_tag|>"
    args_keys = ("parameters", "arguments")

    def _scan(self, text: str, final: bool) -> tuple[str | None, list[_Partial]]:
        i = skip_ws(text, 0)
        rest = text[i:]
        if rest.startswith(self.tag):
            i = skip_ws(text, i + len(self.tag))
        elif not rest.startswith("{"):
            if not final and (not rest or self.tag.startswith(rest)):
                return "", []  # not yet known whether this is a call
            return text, []
        calls: list[_Partial] = []
        if final and i >= len(text):
            raise ToolParseError("<|python_tag|> without a call")
        while i < len(text):
            end = self._take(text, i, final, calls)
            if end is None:
                break
            i = skip_ws(text, end)
            if i < len(text):
                if text[i] != ";":
                    raise ToolParseError("calls must be separated by ';'")
                i = skip_ws(text, i + 1)
        return None, calls


class MistralParser(ToolParser):
    name = "mistral"
    marker, args_tag = "[TOOL_CALLS]", "[ARGS]"

    def __init__(self, id_factory: Callable[[], str] | None = None) -> None:
        super().__init__(id_factory or mistral_call_id)

    def _scan(self, text: str, final: bool) -> tuple[str | None, list[_Partial]]:
        content, first = _content_before(text, self.marker, final)
        if first < 0:
            return content, []
        calls: list[_Partial] = []
        i = skip_ws(text, first + len(self.marker))
        if i < len(text) and text[i] == "[":  # before v11: one JSON array of calls
            i = skip_ws(text, i + 1)
            while i < len(text) and text[i] != "]":
                if text[i] == ",":
                    i = skip_ws(text, i + 1)
                    continue
                end = self._take(text, i, final, calls)
                if end is None:
                    break
                i = skip_ws(text, end)
            if final and not calls:
                raise ToolParseError("[TOOL_CALLS] without a call")
            return content, calls
        seg = first  # v11+: [TOOL_CALLS]name[ARGS]{...}, repeated
        while seg >= 0:
            start = seg + len(self.marker)
            brace = text.find("{", start)
            if brace < 0:
                break
            name = text[start:brace].replace(self.args_tag, "").strip()
            if not name:
                raise ToolParseError("a [TOOL_CALLS] call has no name")
            end = value_end(text, brace, final)
            calls.append(_Partial(name, text[brace:end] if end is not None else text[brace:], end is not None))
            if end is None:
                break
            if calls[-1].done:
                json.loads(calls[-1].args)
            seg = text.find(self.marker, end)
        if final and not calls:
            raise ToolParseError("[TOOL_CALLS] without a call")
        return content, calls


_CLASSES = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "llama4_json": Llama3JsonParser,
            "mistral": MistralParser}


class ToolCallStream:
    """Incremental parsing: `feed(delta)` -> OpenAI delta dicts ({"content": ...} or {"tool_calls": [...]});
    `finish()` flushes what was held back (a possible partial marker, trailing whitespace)."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.content_sent = 0
        self.ids: list[str] = []
        self.args_sent: list[int] = []
        self.failed = False  # malformed tool-call JSON: nothing more is streamed as tool calls

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        return self._emit(final=False)

    def finish(self) -> list[dict]:
        return self._emit(final=True)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls streamed so far (complete after finish())."""
        try:
            _, calls = self.parser._scan(self.text, final=True)
        except (ToolParseError, ValueError):
            calls = []
        return [ToolCall(i, c.name, c.args) for i, c in zip(self.ids, calls) if c.name is not None]

    def _emit(self, final: bool) -> list[dict]:
        if not self.failed:
            try:
                return self._diff(*self.parser._scan(self.text, final))
            except (ToolParseError, ValueError):
                self.failed = True
        if self.ids:
            return []  # calls already streamed cannot be taken back: the malformed rest is dropped
        rest, self.content_sent = self.text[self.content_sent:], len(self.text)  # plain text from here on
        return [{"content": rest}] if rest else []

    def _diff(self, content: str | None, calls: list[_Partial]) -> list[dict]:
        out: list[dict] = []
        content = content or ""
        if len(content) > self.content_sent and not self.ids:
            out.append({"content": content[self.content_sent:]})
            self.content_sent = len(content)
        for k, c in enumerate(calls):
            if c.name is None:
                break  # OpenAI streams calls in order, each name before its arguments
            if k == len(self.ids):
                self.ids.append(self.parser.new_id())
                self.args_sent.append(0)
                out.append({"tool_calls": [{"index": k, "id": self.ids[k], "type": "function",
                                            "function": {"name": c.name, "arguments": ""}}]})
            if len(c.args) > self.args_sent[k]:
                out.append({"tool_calls": [{"index": k, "function": {"arguments": c.args[self.args_sent[k]:]}}]})
                self.args_sent[k] = len(c.args)
        return out


def get_tool_parser(name: str | None = None, chat_template: str | None = None,
                    id_factory: Callable[[], str] | None = None) -> ToolParser | None:
    """The parser named `name` (vLLM's --tool-call-parser values), else the one the chat template's
    tool-call format implies; None when the template shows none."""
    if name is None:
        name = parser_name_for_template(chat_template)
        if name is None:
            return None
    if name not in _CLASSES:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(PARSERS)}")
    return _CLASSES[name](id_factory)


def parser_name_for_template(chat_template: str | None) -> str | None:
    """Which format a chat template teaches the model for tool calls."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and "parameters" in t and "tools" in t):
        return "llama3_json"
    return None
