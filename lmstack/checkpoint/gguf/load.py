"""GGUF file -> ModelConfig + float32 state dict under HF names (+ a tokenizer folder), a model, or an
HF folder. Reads llama.cpp's files as well as lmstack's: every tensor type the `gguf` package can
dequantize, the llama q/k permutation undone, Llama 3.1 rope factors turned back into rope_scaling."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from lmstack.checkpoint.gguf.errors import GGUFError, gguf_module
from lmstack.checkpoint.gguf.hparams import config_from_gguf
from lmstack.checkpoint.gguf.names import ROPE_FREQS, gguf_to_hf_name, needs_qk_permutation, unpermute_qk
from lmstack.checkpoint.gguf.quants import dequantize
from lmstack.checkpoint.gguf.reader import open_gguf
from lmstack.checkpoint.gguf.tokenizer import write_tokenizer
from lmstack.config import ModelConfig


def _empty_model(cfg: ModelConfig):
    from lmstack.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get (MemAvailable), None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits(path: Path, tensors: dict) -> None:
    """Refuse before allocating: the float32 copies of every tensor must fit in available memory."""
    need = 4 * sum(int(np.prod([int(d) for d in t.shape])) for t in tensors.values())
    have = available_memory()
    if have is not None and need > have:
        raise GGUFError(f"{path}: dequantizing its weights to float32 needs {_size(need)}, but only {_size(have)} "
                        "of memory is available")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def load_gguf(path: str | Path, tokenizer_dir: str | Path | None = None, with_tokenizer: bool = True
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """GGUF file -> (ModelConfig, float32 state_dict under HF names, tokenizer folder or None).

    Every tensor is checked against the shape the config implies before it is dequantized. The
    tokenizer folder is `tokenizer_dir` (created) or a fresh temporary directory."""
    path = Path(path)
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(reader, path, tensors)
    want = {k: tuple(v.shape) for k, v in _empty_model(cfg).state_dict().items() if not k.startswith("rotary.")}
    names: dict[str, str] = {}  # GGUF name -> HF name, every shape checked before anything is dequantized
    for name, t in tensors.items():
        if name == ROPE_FREQS:  # already turned into cfg.rope_scaling
            continue
        hf = gguf_to_hf_name(name)
        if hf is None or hf not in want:
            raise GGUFError(f"{path}: tensor {name!r} has no lmstack counterpart for {cfg.architecture}")
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        if shape != want[hf]:
            raise GGUFError(f"{path}: tensor {name!r} has shape {shape}, but the file's hyperparameters make it "
                            f"{want[hf]}")
        names[name] = hf
    missing = sorted(set(want) - set(names.values()) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise GGUFError(f"{path}: missing tensors (HF names): {missing[:5]}")
    _check_fits(path, tensors)
    sd: dict[str, torch.Tensor] = {}
    for name, hf in names.items():
        w = dequantize(tensors[name], str(path))
        which = needs_qk_permutation(cfg.model_type, hf)
        if which:
            w = unpermute_qk(w, cfg.num_heads if which == "q" else cfg.num_kv_heads)
        sd[hf] = w
    tok_dir = None
    if with_tokenizer:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else Path(tempfile.mkdtemp(prefix="lmstack-gguf-"))
        write_tokenizer(reader, path, tok_dir)
    return cfg, sd, tok_dir


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype):
    """A Transformer in eval mode on the CPU with these (already shape-checked) weights."""
    from lmstack.model.rope import RotaryEmbedding

    model = _empty_model(cfg).to_empty(device="cpu").to(dtype)
    if model.rotary is not None:
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v.to(dtype))
    return model.eval()


def load_gguf_model(path: str | Path, dtype: str | torch.dtype | None = "auto"):
    """GGUF file -> (Transformer in eval mode, lmstack Tokenizer). What load_model / LLM call for *.gguf.
    dtype "auto" follows lmstack.precision's rule (as every entry point does)."""
    from lmstack.precision import compute_dtype
    from lmstack.tokenizer import Tokenizer

    cfg, sd, tok_dir = load_gguf(path)
    return build_model(cfg, sd, compute_dtype(dtype)), Tokenizer.from_dir(tok_dir)


def source_dtype(path: str | Path) -> torch.dtype:
    """The float type that keeps a GGUF file's weights at their precision: float32 if any 2-D tensor is
    F32, else bfloat16 for BF16 tensors (with quantized ones or alone), float16 for F16 and quantized
    tensors, float32 where F16 and BF16 are mixed (neither holds both). Quantized blocks (d * q (+ m),
    fp16 scales) fit no 16-bit type exactly; float16 rounds them to 2^-11 relative, far below their
    quantization step (Q8_0: 1/127 of the block's range), where bfloat16's 2^-8 would not be."""
    Q = gguf_module().GGMLQuantizationType
    kinds = {Q(t.tensor_type) for t in open_gguf(path).tensors if len(t.shape) >= 2}
    if Q.F32 in kinds or Q.F64 in kinds or {Q.F16, Q.BF16} <= kinds:
        return torch.float32
    return torch.bfloat16 if Q.BF16 in kinds else torch.float16


def gguf_to_hf(path: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert a GGUF file into an HF folder (config.json, model.safetensors, tokenizer files), in
    `dtype` or, by default, the file's own precision (source_dtype)."""
    from lmstack.model.loading import save_model

    out = Path(out_dir)
    dt = dtype or source_dtype(path)
    cfg, sd, _ = load_gguf(path, tokenizer_dir=out)
    save_model(build_model(cfg, sd, dt), out, dtype=dt)
    return out
