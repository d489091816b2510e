"""The one logger and the one progress-bar helper (DESIGN.md: library code never prints)."""
from __future__ import annotations

import logging
import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

logger = logging.getLogger("lmstack")


def setup_logging(level: int = logging.INFO) -> None:
    """Called by the CLI only: diagnostics go to stderr, stdout stays for results."""
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[lmstack] %(message)s"))
        logger.addHandler(h)
    logger.setLevel(level)


def progress(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
             disable: bool | None = None, **kw: Any) -> tqdm:
    """A tqdm bar on stderr; hidden when stderr is not a terminal unless LMSTACK_PROGRESS=1."""
    import os

    if disable is None:
        disable = not (sys.stderr.isatty() or os.environ.get("LMSTACK_PROGRESS") == "1")
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True, **kw)
