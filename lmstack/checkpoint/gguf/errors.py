"""The one error type of GGUF import / export, and the import of the `gguf` package."""
from __future__ import annotations

from types import ModuleType

from lmstack.config import ConfigError


class GGUFError(ConfigError):
    """A GGUF file or export request lmstack cannot handle; the message names the file and the value."""


def gguf_module() -> ModuleType:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover
        raise GGUFError("GGUF support needs the `gguf` package: pip install gguf") from e
    return gguf
