"""Reading GGUF key-value fields with a default."""
from __future__ import annotations

from typing import Any


def field(reader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()
