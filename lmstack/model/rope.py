"""Rotary position embedding (Su et al. 2021) with the context-extension scalings HF checkpoints use.

RoPE rotates each (x_i, x_{i+d/2}) pair of a query/key head by angle pos * inv_freq_i, so that
q·k depends only on the relative position (tested). Frequencies and angles are computed in fp32:
in bf16, pos * inv_freq loses the low bits for positions in the thousands.

Layout: the "rotate_half" (GPT-NeoX) pairing that HF Llama/Qwen/Mistral checkpoints use, i.e.
pairs are (i, i + d/2), not interleaved (i, i+1).
"""
from __future__ import annotations

import math
from typing import Any

import torch


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended."""
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(dim: int, theta: float, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): NTK-by-parts interpolation plus an attention temperature (mscale)."""
    orig = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor") or max_pos / orig

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = get_mscale(factor, m) / get_mscale(factor, m_all) if (m and m_all) else get_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 -> keep original frequency (high-frequency dims)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attn)


def _longrope_inv_freq(dim: int, theta: float, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      float]:
    """LongRoPE (Ding et al. 2024; Phi-3): per-frequency rescale factors, `short_factor` within the trained
    context and `long_factor` beyond it, and attention scaled by sqrt(1 + ln(s) / ln(L_orig)) where
    s = max_position_embeddings / L_orig (unless `factor` / `attention_factor` say otherwise)."""
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / orig
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    short = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * base)
    long = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32) * base)
    return short, long, float(attn)


class RotaryEmbedding(torch.nn.Module):
    """Computes (cos, sin) for arbitrary per-token positions; the scaling type comes from rope_scaling."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_pos = head_dim, theta, max_pos
        self.scaling = dict(scaling or {})
        self.rope_type = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        self.attention_scaling = 1.0
        inv = default_inv_freq(head_dim, theta)
        if self.rope_type == "linear":
            inv = inv / self.scaling["factor"]  # position interpolation: pos / factor
        elif self.rope_type == "llama3":
            self.scaling.setdefault("original_max_position_embeddings", max_pos)
            inv = llama3_inv_freq(inv, self.scaling)
        elif self.rope_type == "yarn":
            inv, self.attention_scaling = _yarn_inv_freq(head_dim, theta, self.scaling, max_pos)
        elif self.rope_type == "longrope":
            inv, long_inv, self.attention_scaling = _longrope_inv_freq(head_dim, theta, self.scaling, max_pos)
            self.register_buffer("long_inv_freq", long_inv, persistent=False)
        self.register_buffer("inv_freq", inv, persistent=False)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        """Dynamic NTK: grow the base once the sequence passes the trained length (as HF does per forward)."""
        orig = self.scaling.get("original_max_position_embeddings") or self.max_pos
        if seq_len <= orig:
            return self.inv_freq
        factor = self.scaling["factor"]
        base = self.theta * ((factor * seq_len / orig) - (factor - 1)) ** (self.head_dim / (self.head_dim - 2))
        return default_inv_freq(self.head_dim, base).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., T) int -> cos, sin (..., T, head_dim) in `dtype`."""
        inv = self.inv_freq
        if self.rope_type == "dynamic":
            inv = self._dynamic_inv_freq(int(positions.max()) + 1)
        elif self.rope_type == "longrope" and int(positions.max()) + 1 > self.scaling["original_max_position_embeddings"]:
            # as transformers decides, per forward: once the longest sequence in it passes the trained
            # length, every token uses the long factors (so in a mixed batch a short sequence does too)
            inv = self.long_inv_freq
        freqs = positions.to(torch.float32)[..., None] * inv.to(positions.device)  # (..., T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D): rotate_half pairing
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin (B, T, D) -> rotated x, same shape."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, D) broadcast over heads
    return x * cos + rotate_half(x) * sin
