"""StructuredOutputsParams: what a request's output must match. Field names are vLLM's.

vLLM's `SamplingParams.structured_outputs` takes a `StructuredOutputsParams` with exactly one
constraint: `json` (a JSON schema), `regex`, `choice` (a list of strings), `grammar` (Lark or GBNF
text), `json_object` (any JSON object) or `structural_tag`; plus the options
`disable_any_whitespace`, `disable_additional_properties` and `whitespace_pattern`. The OpenAI
server's request extras are the same object (`structured_outputs: {...}`); the older extras
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` / `guided_whitespace_pattern`
(deprecated in vLLM 0.10 and removed in 0.12) map onto it as GUIDED_FIELDS says.

This module is plain Python (no torch, no grammar engine): it validates the shape of the request;
grammar.py compiles it and reports what the grammar engine cannot do.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


class StructuredOutputError(ValueError):
    """A constraint lmstack cannot enforce: the message names the field and the problem
    (an unsupported JSON schema keyword, an invalid regex or grammar, a malformed value)."""


# the constraint kinds, in the order vLLM lists them; exactly one is set per request
CONSTRAINT_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# vLLM's deprecated request extras -> the StructuredOutputsParams field they set
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar", "guided_whitespace_pattern": "whitespace_pattern"}


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (a dict, or its JSON text)
    regex: str | None = None  # Rust `regex` syntax (no look-around, no back-references)
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # a Lark grammar (llguidance's dialect) or a GBNF grammar (llama.cpp's)
    json_object: bool | None = None  # any JSON object
    disable_any_whitespace: bool = False  # JSON without whitespace between tokens
    disable_additional_properties: bool = False  # objects that do not say otherwise get additionalProperties: false
    whitespace_pattern: str | None = None  # the regex JSON whitespace must match (instead of [ \t\n\r]+)
    structural_tag: str | None = None  # vLLM's structural tags: not supported (a clear error)
    schema: dict | None = field(default=None, init=False, repr=False)  # `json` parsed

    def __post_init__(self) -> None:
        given = [f for f in CONSTRAINT_FIELDS if getattr(self, f) is not None]
        if len(given) != 1:
            raise StructuredOutputError(
                "structured_outputs needs exactly one of " + ", ".join(CONSTRAINT_FIELDS)
                + (f"; got {len(given)}: {', '.join(given)}" if given else "; got none"))
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = _json.loads(schema)
                except _json.JSONDecodeError as e:
                    raise StructuredOutputError(f"structured_outputs.json is not valid JSON: {e}") from e
            if not isinstance(schema, dict):
                raise StructuredOutputError(
                    f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
            self.schema = schema
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise StructuredOutputError("structured_outputs.regex must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise StructuredOutputError("structured_outputs.choice must be a non-empty list of strings")
            if any(c == "" for c in self.choice):
                raise StructuredOutputError("structured_outputs.choice must not contain an empty string")
            self.choice = list(self.choice)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise StructuredOutputError("structured_outputs.grammar must be a non-empty string")
        if self.json_object is not None and self.json_object is not True:
            raise StructuredOutputError(f"structured_outputs.json_object must be true, got {self.json_object!r}")
        if self.structural_tag is not None:
            raise StructuredOutputError("structured_outputs.structural_tag is not supported; use json, regex, "
                                        "choice or grammar (a Lark grammar can embed JSON schemas with %json)")
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise StructuredOutputError(f"structured_outputs.{name} must be a boolean")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise StructuredOutputError("structured_outputs.whitespace_pattern must be a string")

    @property
    def kind(self) -> str:
        """The constraint field that is set ("json", "regex", ...)."""
        return next(f for f in CONSTRAINT_FIELDS if getattr(self, f) is not None)

    def key(self) -> tuple:
        """Hashable identity of the compiled grammar (property order matters: it is the output's)."""
        kind = self.kind
        if kind == "json":
            spec = _json.dumps(self.schema, separators=(",", ":"), ensure_ascii=False)
        elif kind == "choice":
            spec = _json.dumps(self.choice, ensure_ascii=False)
        else:
            spec = str(getattr(self, kind))
        json_like = kind in ("json", "json_object")
        return (kind, spec, self.disable_any_whitespace if json_like else None,
                self.disable_additional_properties if kind == "json" else None,
                self.whitespace_pattern if json_like else None)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StructuredOutputsParams":
        """From the request extra `structured_outputs: {...}`; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StructuredOutputError(f"structured_outputs has unknown field(s) {', '.join(unknown)}; "
                                        f"known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> "StructuredOutputsParams | None":
        """OpenAI's `response_format` -> the constraint it imposes (None for plain text).

        json_schema is enforced whatever `strict` says (as vLLM does); `strict: true` also closes
        every object the schema leaves open (OpenAI's strict mode forbids keys the schema does not
        name), which is disable_additional_properties. Raises StructuredOutputError naming the field."""
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise StructuredOutputError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_object=True)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping):
                raise StructuredOutputError("response_format.json_schema is required when type is json_schema")
            schema = spec.get("schema")
            if schema is None:
                schema = {"type": "object"}  # OpenAI: omitted schema = any object
            strict = spec.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise StructuredOutputError("response_format.json_schema.strict must be a boolean")
            if not isinstance(schema, Mapping):
                raise StructuredOutputError("response_format.json_schema.schema must be a JSON schema object")
            return cls(json=dict(schema), disable_additional_properties=bool(strict))
        raise StructuredOutputError(
            f"response_format.type must be one of text, json_object, json_schema; got {kind!r}")
