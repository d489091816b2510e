"""Compiling a request's constraint into per-sequence matchers, on llguidance.

Why llguidance (benchmarks/grammar_engines.py, 150k-token vocabulary, this CPU): it compiles a
constraint 19-290x faster than xgrammar (0.4-2.4 ms against 8-570 ms: it builds lexer states lazily,
so a new schema does not delay its request's first token); its mask is slower than xgrammar's on JSON
(1.5 against 0.18 ms per step of 32 sequences) and faster on regexes, a small part of a decode step
either way; it refuses a JSON schema keyword it cannot enforce, naming it, where xgrammar silently
drops it (so a `strict` output could violate its schema); and it has no dependencies (xgrammar needs
transformers and triton). outlines-core compiles a schema in seconds and has no context-free grammars.

The pieces:
  - one `GrammarCompiler` per engine (tokenizer): the llguidance tokenizer (its token trie, ~1 s for
    150k tokens, built on the first constrained request), and an LRU cache from the constraint's
    key to a compiled prototype matcher;
  - one `GrammarMatcher` per sequence (n > 1: one each), a copy of the prototype. It is keyed by the
    number of generated tokens: `advance(output_ids)` consumes only the ids it has not seen, so
    recomputing a preempted sequence or a prefix-cache hit (prompt tokens only) never advances it
    twice. `is_finished` = the grammar is complete and allows nothing but EOS: the engine ends the
    sequence there, without spending a step on the EOS.
llguidance is imported lazily: a request without structured output never loads it.
"""
from __future__ import annotations

import copy
import json
import re
import threading
from collections import OrderedDict
from typing import Any, Sequence

from lmstack.engine.structured.params import StructuredOutputError, StructuredOutputsParams

_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("additionalProperties", "unevaluatedProperties", "items", "prefixItems", "contains",
               "additionalItems", "not", "if", "then", "else", "allOf", "anyOf", "oneOf")


def llguidance():
    """The llguidance module, or a clear error naming the missing package."""
    try:
        import llguidance as ll
    except ImportError as e:
        raise StructuredOutputError(
            "structured outputs need the 'llguidance' package, which is not installed "
            "(pip install llguidance)") from e
    return ll


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that names properties and says nothing about
    additional ones gets additionalProperties: false (disable_additional_properties / strict)."""
    schema = copy.deepcopy(schema)

    def walk(s: Any) -> None:
        if isinstance(s, list):
            for x in s:
                walk(x)
            return
        if not isinstance(s, dict):
            return
        for k in _SUBSCHEMA_MAPS:
            if isinstance(s.get(k), dict):
                for sub in s[k].values():
                    walk(sub)
        for k in _SUBSCHEMAS:
            if isinstance(s.get(k), (dict, list)):
                walk(s[k])
        if "additionalProperties" not in s and isinstance(s.get("properties"), dict):
            s["additionalProperties"] = False

    walk(schema)
    return schema


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for a constraint; errors name the field."""
    ll = llguidance()
    kind = params.kind
    try:
        if kind in ("json", "json_object"):
            opts: dict[str, Any] = {"whitespace_flexible": not params.disable_any_whitespace}
            if params.whitespace_pattern is not None:
                opts["whitespace_pattern"] = params.whitespace_pattern
            schema = params.schema if kind == "json" else {"type": "object"}
            if params.disable_additional_properties:
                schema = close_objects(schema)
            return ll.LLMatcher.grammar_from_json_schema(schema, defaults=opts)
        if kind == "regex":
            return ll.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return ll.grammar_from("choice", params.choice)
        return ll.grammar_from("grammar", params.grammar)  # Lark as is, GBNF converted to Lark
    except (ValueError, TypeError) as e:
        raise StructuredOutputError(f"structured_outputs.{kind}: {e}") from e


def explain(kind: str, error: str) -> str:
    """llguidance's construction error -> a message that names the field and the feature."""
    error = error.strip()
    m = re.search(r"Unimplemented keys: \[([^\]]*)\]", error)
    if kind == "json" and m:
        keys = ", ".join(k.strip().strip('"') for k in m.group(1).split(","))
        return f"structured_outputs.json: unsupported JSON schema feature(s): {keys}"
    if len(error) > 600:
        error = error[:600] + " ..."
    what = {"json": "invalid or unsupported JSON schema", "json_object": "invalid json_object options",
            "regex": "invalid regex", "choice": "invalid choice list", "grammar": "invalid grammar"}[kind]
    return f"structured_outputs.{kind}: {what}: {error}"


def _forced_strings(params: StructuredOutputsParams) -> list[str]:
    """The literal texts a constraint forces (choices, schema consts / enums / property names, quoted
    grammar literals, a regex with its escapes removed)."""
    kind = params.kind
    if kind == "choice":
        return list(params.choice)
    if kind == "regex":
        return [re.sub(r"\\(.)", r"\1", params.regex)]
    if kind == "grammar":
        out = []
        for lit in re.findall(r'"(?:[^"\\\n]|\\.)*"', params.grammar):
            try:
                out.append(json.loads(lit))
            except ValueError:
                out.append(lit)
        return out
    out: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k in ("const", "enum"):
                if k in x:
                    out.append(json.dumps(x[k], ensure_ascii=False))
            if isinstance(x.get("properties"), dict):
                out.extend(x["properties"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(params.schema)
    return out


def special_text_conflicts(params: StructuredOutputsParams, special_texts: Sequence[str]) -> list[str]:
    """Special tokens whose text a constraint forces as text. llguidance tokenizes forced text
    canonically, which yields the special token, then rejects that token as not text (a known
    llguidance limitation): refused up front instead of failing mid-generation."""
    forced = _forced_strings(params)
    return sorted(t for t in special_texts if t and any(t in f for f in forced))


class GrammarMatcher:
    """The grammar state of one sequence."""

    __slots__ = ("matcher", "num_tokens", "error")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher  # llguidance.LLMatcher
        self.num_tokens = 0  # generated tokens consumed so far
        self.error: str | None = None

    def advance(self, output_ids: Sequence[int]) -> None:
        """Consume the generated ids this matcher has not seen yet (none on a repeated call)."""
        if self.error is not None or self.num_tokens >= len(output_ids):
            return
        new = list(output_ids[self.num_tokens:])
        self.num_tokens = len(output_ids)
        if self.matcher.is_stopped():
            return  # complete: only EOS was allowed (the engine stops there; an ignored EOS may follow)
        if not self.matcher.consume_tokens(new):
            self.error = self.matcher.get_error() or f"token {new} rejected by the grammar"

    @property
    def is_finished(self) -> bool:
        """The output is complete: nothing but EOS may follow."""
        return self.error is None and self.matcher.is_stopped()

    def check(self) -> None:
        """Record an error the matcher hit while computing its mask (e.g. a parser resource limit)."""
        if self.error is None and self.matcher.is_error():
            self.error = self.matcher.get_error()


class GrammarCompiler:
    """Constraint -> compiled prototype (cached) -> one GrammarMatcher per sequence."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int],
                 special_texts: Sequence[str] = (), cache_size: int = 64) -> None:
        ll = llguidance()
        if not eos_token_ids:
            raise StructuredOutputError("structured outputs need an EOS token id (the model and tokenizer name none)")
        self.vocab_size = vocab_size
        self.tokenizer = ll.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))
        self.special_texts = list(special_texts)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> "GrammarCompiler":
        """From an lmstack Tokenizer (a `tokenizers` backend); the mask covers the model's vocab_size ids
        (ids the tokenizer does not have are never allowed)."""
        backend = getattr(tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise StructuredOutputError("structured outputs need a tokenizer with a `tokenizers` backend")
        n = backend.get_vocab_size(with_added_tokens=True)
        if n > vocab_size:
            raise StructuredOutputError(f"the tokenizer has {n} tokens but the model only {vocab_size} logits")
        specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
        return cls(backend.to_str(), vocab_size, eos_token_ids, specials)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled prototype matcher of a constraint (from the cache when seen before)."""
        key = params.key()
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
                return proto
        clash = special_text_conflicts(params, self.special_texts)
        if clash:
            raise StructuredOutputError(
                f"structured_outputs.{params.kind}: forces the text of special token(s) {', '.join(clash)}, which "
                "cannot be generated as text; in a Lark grammar write the token itself (<[id]>)")
        ll = llguidance()
        proto = ll.LLMatcher(self.tokenizer, grammar_text(params), log_level=0)
        if proto.is_error():
            raise StructuredOutputError(explain(params.kind, proto.get_error()))
        with self._lock:
            self._cache[key] = proto
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return proto

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        return GrammarMatcher(self.compile(params).deep_copy())
