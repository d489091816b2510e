"""Scaled dot-product attention, three ways, one signature.

All functions take q (B, H, Tq, D) and k, v (B, Hkv, Tk, D). MHA, MQA and GQA are one code path:
H = G * Hkv and query head h reads key/value head h // G (Ainslie et al. 2023).

- `naive`: materialises the (Tq, Tk) score matrix. The correctness reference.
- `sdpa`:  torch.nn.functional.scaled_dot_product_attention (fused kernels where available).
- `tiled`: the FlashAttention algorithm (Dao et al. 2022) in plain PyTorch: queries and keys are
  processed in blocks with an online softmax (running max m, running sum l, rescaled accumulator),
  so memory is O(block_q * block_k) per head instead of O(Tq * Tk).

Masking: `causal` with `q_offset` (queries are the last Tq of the Tk key positions, so query i sits
at absolute index q_offset + i), optional sliding `window` (key j is visible to query i iff
i - window < j <= i, Mistral's convention), and `key_padding_mask` (B, Tk) bool, True = real key.
Rows with no visible key (left padding) return zeros rather than NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMPLS = ("naive", "sdpa", "tiled")


def _visible(q_idx: torch.Tensor, k_idx: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor | None:
    """(Tq, Tk) bool mask from absolute query/key indices, or None when everything is visible."""
    if not causal and window is None:
        return None
    diff = q_idx[:, None] - k_idx[None, :]  # (Tq, Tk): how far back the key is
    ok = diff >= 0 if causal else torch.ones_like(diff, dtype=torch.bool)
    if window is not None:
        ok = ok & (diff < window)
    return ok


def _full_mask(
    B: int, Tq: int, Tk: int, device: torch.device, causal: bool, window: int | None,
    q_offset: int, key_padding_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """(B or 1, 1, Tq, Tk) bool mask combining causal/window and padding."""
    q_idx = torch.arange(q_offset, q_offset + Tq, device=device)
    k_idx = torch.arange(Tk, device=device)
    m = _visible(q_idx, k_idx, causal, window)
    mask = None if m is None else m[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Tk)
        mask = pad if mask is None else (mask & pad)
    return mask


def _group(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, Hkv, G, T, D): query heads grouped by the kv head they share."""
    B, H, T, D = q.shape
    return q.view(B, n_kv, H // n_kv, T, D)


def naive_attention(q, k, v, causal=True, window=None, q_offset=None, key_padding_mask=None, scale=None):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    q_offset = Tk - Tq if q_offset is None else q_offset
    qg = _group(q, Hkv)  # (B, Hkv, G, Tq, D)
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)).float() * scale  # (B, Hkv, G, Tq, Tk)
    mask = _full_mask(B, Tq, Tk, q.device, causal, window, q_offset, key_padding_mask)
    if mask is not None:
        mask = mask.unsqueeze(2)  # (B|1, 1, 1, Tq, Tk) broadcast over groups
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
    out = torch.matmul(probs.to(v.dtype), v.unsqueeze(2))  # (B, Hkv, G, Tq, D)
    return out.reshape(B, H, Tq, D)


def sdpa_attention(q, k, v, causal=True, window=None, q_offset=None, key_padding_mask=None, scale=None):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q_offset = Tk - Tq if q_offset is None else q_offset
    if Hkv != H:  # expand (a view) rather than rely on enable_gqa support in every kernel
        G = H // Hkv
        k = k[:, :, None].expand(B, Hkv, G, Tk, D).reshape(B, H, Tk, D)
        v = v[:, :, None].expand(B, Hkv, G, Tk, D).reshape(B, H, Tk, D)
    if key_padding_mask is None and window is None and (not causal or (Tq == Tk and q_offset == 0)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, scale=scale)
    mask = _full_mask(B, Tq, Tk, q.device, causal, window, q_offset, key_padding_mask)
    empty = ~mask.any(-1, keepdim=True)  # rows with no visible key would give NaN
    mask = mask | empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(empty, 0.0) if bool(empty.any()) else out


def tiled_attention(q, k, v, causal=True, window=None, q_offset=None, key_padding_mask=None, scale=None,
                    block_q: int = 128, block_k: int = 128):
    """FlashAttention forward (Algorithm 1 of Dao et al. 2022) with blockwise online softmax.

    For each query block: m = running row max, l = running sum of exp(s - m), acc = running
    sum of exp(s - m) @ V. A new key block with scores s updates
        m' = max(m, rowmax(s)); acc = acc * exp(m - m') + exp(s - m') @ V_blk; l = l * exp(m - m') + rowsum(exp(s - m'))
    and out = acc / l at the end. Key blocks entirely outside the causal/window band are skipped.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    q_offset = Tk - Tq if q_offset is None else q_offset
    qg = _group(q, Hkv)  # (B, Hkv, G, Tq, D)
    G = qg.shape[2]
    out = torch.empty_like(qg)
    kT = k.transpose(-1, -2)  # (B, Hkv, D, Tk)
    for qs in range(0, Tq, block_q):
        qe = min(qs + block_q, Tq)
        qb = qg[:, :, :, qs:qe].float() * scale  # (B, Hkv, G, bq, D)
        bq = qe - qs
        m = torch.full((B, Hkv, G, bq, 1), float("-inf"), device=q.device)
        l = torch.zeros((B, Hkv, G, bq, 1), device=q.device)
        acc = torch.zeros((B, Hkv, G, bq, D), device=q.device)
        q_lo, q_hi = q_offset + qs, q_offset + qe - 1  # absolute index range of this query block
        for ks in range(0, Tk, block_k):
            ke = min(ks + block_k, Tk)
            if causal and ks > q_hi:
                break  # every later key block is in the future of every query here
            if window is not None and ke - 1 <= q_lo - window:
                continue  # whole block slid out of every query's window
            s = torch.matmul(qb, kT[:, :, None, :, ks:ke].float())  # (B, Hkv, G, bq, bk)
            q_idx = torch.arange(q_lo, q_hi + 1, device=q.device)
            k_idx = torch.arange(ks, ke, device=q.device)
            vis = _visible(q_idx, k_idx, causal, window)
            if key_padding_mask is not None:
                pad = key_padding_mask[:, None, None, None, ks:ke].to(torch.bool)  # (B, 1, 1, 1, bk)
                vis = pad if vis is None else (vis[None, None, None] & pad)
            if vis is not None:
                s = s.masked_fill(~vis, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            # a row that has seen no visible key yet keeps m = -inf; use 0 there to avoid inf - inf
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe)  # (B, Hkv, G, bq, bk)
            alpha = torch.exp(torch.where(torch.isinf(m), m, m - m_safe))
            l = l * alpha + p.sum(-1, keepdim=True)
            acc = acc * alpha + torch.matmul(p, v[:, :, None, ks:ke].float())
            m = m_new
        out[:, :, :, qs:qe] = (acc / l.clamp_min(1e-30)).to(q.dtype)  # l == 0 -> acc == 0 -> zeros
    return out.reshape(B, H, Tq, D)


def attention(q, k, v, impl: str = "sdpa", causal: bool = True, window: int | None = None,
              q_offset: int | None = None, key_padding_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Dispatch to one implementation; see the module docstring for shapes and masking rules."""
    fn = {"naive": naive_attention, "sdpa": sdpa_attention, "tiled": tiled_attention}.get(impl)
    if fn is None:
        raise ValueError(f"attention impl {impl!r} is not supported; choose one of {IMPLS}")
    return fn(q, k, v, causal=causal, window=window, q_offset=q_offset,
              key_padding_mask=key_padding_mask, scale=scale)


class DenseMeta:
    """Dense (no cache) attention over a padded batch: `key_padding_mask` (B, T) True = real token."""

    def __init__(self, key_padding_mask: torch.Tensor | None = None, impl: str = "sdpa") -> None:
        self.key_padding_mask, self.impl = key_padding_mask, impl

    def attend(self, layer_idx: int, q, k, v, window: int | None) -> torch.Tensor:
        # (B, T, H, D) -> (B, H, T, D) and back
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), impl=self.impl,
                      causal=True, window=window, key_padding_mask=self.key_padding_mask)
        return o.transpose(1, 2)
