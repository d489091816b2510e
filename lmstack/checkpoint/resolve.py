"""A `--model` path -> what a verb needs, for HF folders and .gguf files alike (every verb that takes
--model takes either)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmstack.config import ConfigError


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix == ".gguf"


def load_for_inference(path: str | Path, dtype: str | torch.dtype | None = "auto") -> tuple[Any, Any]:
    """(model in eval mode, lmstack Tokenizer or None) in the dtype lmstack.precision picks (logged)."""
    from lmstack.precision import compute_dtype
    from lmstack.tokenizer import Tokenizer

    dt = compute_dtype(dtype, what=str(path))
    if is_gguf(path):
        from lmstack.checkpoint.gguf.load import load_gguf_model

        return load_gguf_model(path, dt)
    from lmstack.model.loading import load_model

    model = load_model(path, dtype=dt)
    return model, Tokenizer.from_dir(path) if (Path(path) / "tokenizer.json").is_file() else None


def hf_folder(path: str | Path, work_dir: str | Path) -> Path:
    """An HF folder for `path`: the folder itself, or a .gguf file converted into work_dir (at the file's
    own precision, with its tokenizer) for the verbs that work on folders (quantize, export, train)."""
    p = Path(path)
    if is_gguf(p):
        from lmstack.checkpoint.gguf.load import gguf_to_hf

        return gguf_to_hf(p, work_dir)
    if not p.is_dir():
        raise ConfigError(f"--model {p}: not an HF model folder or a .gguf file")
    return p
