"""GGUF `{arch}.*` hyperparameters <-> ModelConfig, including Llama 3.1 rope scaling, which GGUF
carries as per-frequency divisors (the rope_freqs tensor)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lmstack.checkpoint.gguf.errors import GGUFError, gguf_module
from lmstack.checkpoint.gguf.fields import field
from lmstack.checkpoint.gguf.names import ARCHS, ROPE_FREQS
from lmstack.checkpoint.gguf.quants import dequantize
from lmstack.config import ConfigError, ModelConfig
from lmstack.model.rope import default_inv_freq, llama3_inv_freq


def fit_llama3_scaling(factors: torch.Tensor, head_dim: int, theta: float, source: str) -> dict[str, Any]:
    """llama.cpp's per-frequency rope divisors -> HF's `rope_scaling` {"rope_type": "llama3", ...}.

    Llama 3.1 divides each inverse frequency by 1 (wavelength < L / high), by `factor` (wavelength >
    L / low), or by 1 / ((1 - s) / factor + s) with s = (L / wavelength - low) / (high - low) in
    between. Only the ratios L : low : high matter, so low = 1 is fixed and L, high are solved from the
    band's divisors (least squares; with fewer than two band points high = 4, Meta's value). The fit
    is accepted only if it reproduces every divisor."""
    inv = default_inv_freq(head_dim, theta)
    if factors.shape != inv.shape:
        raise GGUFError(f"{source}: {ROPE_FREQS} has {factors.numel()} values, expected head_dim / 2 = {inv.numel()}")
    f = factors.double()
    wavelen = (2 * math.pi / inv).double()
    factor = float(f.max())
    band = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    s = (1 / f[band] - 1 / factor) / (1 - 1 / factor)  # blend weight of each band frequency
    if int(band.sum()) >= 2:  # L / wavelen - s * high = 1 - s
        A = torch.stack([1 / wavelen[band], -s], dim=1)
        L, high = torch.linalg.lstsq(A, (1 - s)[:, None]).solution.squeeze(1).tolist()
    elif int(band.sum()) == 1:
        high = 4.0
        L = float(wavelen[band][0] * (1 + (high - 1) * s[0]))
    else:  # a step: put L between the longest kept and the shortest divided wavelength
        high = 4.0
        kept, divided = wavelen[f <= 1 + 1e-4], wavelen[f >= factor * (1 - 1e-4)]
        lo_b = float(kept.max()) * high if kept.numel() else 0.0
        hi_b = float(divided.min()) if divided.numel() else float("inf")
        L = math.sqrt(lo_b * hi_b) if 0 < lo_b < hi_b < float("inf") else max(lo_b * 1.01, 1.0)
    if abs(L - round(L)) < 1e-3 * L:  # checkpoints state a whole number of tokens (Meta: 8192)
        L = round(L)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
               "original_max_position_embeddings": L}
    if not (high > 1 and L > 0) or not torch.allclose(inv / llama3_inv_freq(inv, scaling), factors.float(),
                                                      rtol=1e-3, atol=0):
        raise GGUFError(f"{source}: {ROPE_FREQS} does not follow Llama 3.1's rope scaling; lmstack cannot "
                        "represent these per-frequency factors")
    return scaling


def config_from_gguf(reader, path: Path, tensors: dict) -> ModelConfig:
    """{arch}.* and tokenizer ids -> ModelConfig (tensors: name -> reader tensor, to read rope_freqs)."""
    try:
        return _config_from_gguf(reader, path, tensors)
    except GGUFError:
        raise
    except (ConfigError, TypeError, ValueError) as e:  # a value of the wrong kind or out of range
        raise GGUFError(f"{path}: the file's hyperparameters do not make a valid model: {e}") from None


def _config_from_gguf(reader, path: Path, tensors: dict) -> ModelConfig:
    names = set(tensors)
    arch = field(reader, "general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {list(ARCHS)}")

    def get(key: str, default: Any = None, kind: type = int) -> Any:
        v = field(reader, f"{arch}.{key}", default)
        if v is None:
            raise GGUFError(f"{path}: required GGUF key {arch}.{key} is missing")
        return kind(v)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    n_vocab = field(reader, f"{arch}.vocab_size")
    if n_vocab is None:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        n_vocab = len(tokens.data) if tokens is not None else None
    if n_vocab is None:
        raise GGUFError(f"{path}: cannot tell the vocabulary size (no {arch}.vocab_size or tokenizer.ggml.tokens)")
    scaling_type = field(reader, f"{arch}.rope.scaling.type")
    rope_scaling = None
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor", kind=float)}
    elif scaling_type not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {scaling_type!r} is not supported")
    theta = get("rope.freq_base", 10000.0, float)
    if ROPE_FREQS in names:
        if rope_scaling is not None or arch != "llama":
            raise GGUFError(f"{path}: per-frequency rope factors ({ROPE_FREQS}) are supported only for llama "
                            "models without another rope scaling")
        head_dim = get("attention.key_length", 0) or hidden // heads
        rope_scaling = fit_llama3_scaling(dequantize(tensors[ROPE_FREQS], str(path)).float(), head_dim, theta,
                                          str(path))
    return ModelConfig(
        model_type=arch, vocab_size=int(n_vocab), hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"), num_heads=heads, num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", 0), max_position_embeddings=get("context_length", 2048),
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6, float), rope_theta=theta, rope_scaling=rope_scaling,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names, tie_embeddings="output.weight" not in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
    )


def write_hparams(w, cfg: ModelConfig) -> None:
    """ModelConfig -> {arch}.* keys, in the order the exporter always writes them."""
    gguf = gguf_module()
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if rope_type(cfg) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def rope_type(cfg: ModelConfig) -> str | None:
    return None if cfg.rope_scaling is None else cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
