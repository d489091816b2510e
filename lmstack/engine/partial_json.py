"""Scanning JSON text that is still arriving (a model's reply, token by token).

Each function reads from an index and says how far a value goes, or None when the text ends before
the value does (it may still grow); malformed JSON raises PartialJSONError. Used by the tool-call
parsers to find names and argument objects in partial output without re-parsing it as a whole.
"""
from __future__ import annotations

import json

WS = " \t\r\n"


class PartialJSONError(ValueError):
    """Malformed JSON (not merely incomplete)."""


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in WS:
        i += 1
    return i


def string_end(s: str, i: int) -> int | None:
    """s[i] == '"': index after the closing quote, or None if the string is not closed yet."""
    j = i + 1
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def value_end(s: str, i: int, final: bool) -> int | None:
    """End (exclusive) of the JSON value starting at s[i], or None while it may still grow."""
    c = s[i]
    if c == '"':
        return string_end(s, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(s):
            ch = s[j]
            if ch == '"':
                e = string_end(s, j)
                if e is None:
                    return None
                j = e
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i  # number / true / false / null: ends at a delimiter
    while j < len(s) and s[j] not in WS + ",}]":
        j += 1
    return j if j < len(s) or final else None


def object_members(s: str, i: int, final: bool) -> tuple[list[tuple[str, int, int | None]], int | None]:
    """s[i] == '{': the object's members (key, value start, value end or None) as far as they go, and the
    object's end (None while open). Raises PartialJSONError on malformed JSON."""
    out: list[tuple[str, int, int | None]] = []
    j = skip_ws(s, i + 1)
    while j < len(s):
        if s[j] == "}":
            return out, j + 1
        if s[j] == "," and out:
            j = skip_ws(s, j + 1)
            continue
        if s[j] != '"':
            raise PartialJSONError(f"expected a key at {j}")
        k = string_end(s, j)
        if k is None:
            return out, None
        key = json.loads(s[j:k])
        j = skip_ws(s, k)
        if j >= len(s):
            return out, None
        if s[j] != ":":
            raise PartialJSONError(f"expected ':' at {j}")
        v = skip_ws(s, j + 1)
        if v >= len(s):
            return out, None
        e = value_end(s, v, final)
        out.append((key, v, e))
        if e is None:
            return out, None
        j = skip_ws(s, e)
    return out, None
