"""GGUF tensor names <-> HF names, and the q/k row permutation of llama.cpp's `llama` architecture.

Layout facts (from llama.cpp's convert_hf_to_gguf.py): the llama architecture uses GPT-J style
"interleaved" RoPE, so q/k rows are permuted from HF's half-split order with
w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2); qwen2/qwen3 use NEOX RoPE (HF
order, no permutation). A tied lm_head is simply omitted (llama.cpp falls back to token_embd).
"""
from __future__ import annotations

import re

import torch

ARCHS = ("llama", "qwen2", "qwen3")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency rope divisors (Llama 3.1 scaling)

# HF module suffix -> GGUF tensor base name (per layer under blk.{i}.)
_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_MAP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def hf_to_gguf_name(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (None for non-weights)."""
    mod, _, kind = name.rpartition(".")
    if mod in _GLOBAL_MAP:
        return f"{_GLOBAL_MAP[mod]}.{kind}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", mod)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{kind}"
    return None


def gguf_to_hf_name(name: str) -> str | None:
    base, _, kind = name.rpartition(".")
    for hf, g in _GLOBAL_MAP.items():
        if base == g:
            return f"{hf}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", base)
    if m:
        for hf, g in _LAYER_MAP.items():
            if m.group(2) == g:
                return f"model.layers.{m.group(1)}.{hf}.{kind}"
    return None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF half-split rotary rows -> llama.cpp interleaved rows (llama arch only). w: (rows, ...)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def needs_qk_permutation(arch: str, hf_name: str) -> str | None:
    """'q' / 'k' when this tensor's rows are permuted in the GGUF file (llama arch), else None."""
    if arch != "llama":
        return None
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return "q"
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return "k"
    return None
