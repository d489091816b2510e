"""GGUF tensor types: which type each tensor of an export gets (llama.cpp's rules), quantizing to it,
and dequantizing any type a file may hold.

Quantizers: the `gguf` package's for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and BF16; Q4_K and Q6_K here (the
package only dequantizes K-quants), following llama.cpp's reference quantizers (ggml-quants.c,
quantize_row_q4_K_ref / quantize_row_q6_K_ref): the same block layouts and the same search for
scales, vectorized over blocks in float32.
Dequantizers: the `gguf` package's (every type it has one for), plus F64 and Q8_K here.
"""
from __future__ import annotations

import numpy as np
import torch

from lmstack.checkpoint.gguf.errors import GGUFError, gguf_module
from lmstack.log import logger

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k")
# export type -> (llama.cpp file type name, default tensor type name); q4_k is llama-quantize's Q4_K (= Q4_K_M)
_FTYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
           "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "q4_0": ("MOSTLY_Q4_0", "Q4_0"), "q4_1": ("MOSTLY_Q4_1", "Q4_1"),
           "q5_0": ("MOSTLY_Q5_0", "Q5_0"), "q5_1": ("MOSTLY_Q5_1", "Q5_1"), "q4_k": ("MOSTLY_Q4_K_M", "Q4_K"),
           "q6_k": ("MOSTLY_Q6_K", "Q6_K")}
# llama-quant.cpp's tensor_type_fallback: a row length the block size does not divide
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def file_type(out_type: str) -> int:
    return int(getattr(gguf_module().LlamaFileType, _FTYPES[out_type][0]))


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M mixtures (first and last eighth,
    every third in between)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(gguf_name: str, shape: tuple[int, ...], out_type: str, tied: bool, n_layers: int):
    """The GGML type of one exported tensor, as llama.cpp's llama-quantize picks it for that file type
    (llama-quant.cpp, llama_tensor_get_type): 1-D tensors stay F32; the output matrix - or the token
    embedding when it doubles as the output (tied) - gets Q6_K unless the file is Q8_0; in Q4_K (_M),
    attn_v and ffn_down of the layers _use_more_bits picks get Q6_K; a row length the block size does
    not divide falls back (Q4_K -> Q5_0, Q6_K -> Q8_0, then F16)."""
    Q = gguf_module().GGMLQuantizationType
    if len(shape) < 2 or out_type == "f32":
        return Q.F32
    base = getattr(Q, _FTYPES[out_type][1])
    if out_type in ("f16", "bf16"):
        return base
    cols = shape[-1]
    new = base
    layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        if cols % _block(base):
            new = Q.Q8_0
        elif base != Q.Q8_0:
            new = Q.Q6_K
    elif out_type == "q4_k" and (".attn_v." in gguf_name or ".ffn_down" in gguf_name) and _use_more_bits(layer, n_layers):
        new = Q.Q6_K
    if cols % _block(new) and new.name in _FALLBACK:
        new = getattr(Q, _FALLBACK[new.name])
    if cols % _block(new):
        logger.warning("gguf export: %s has row length %d (not a multiple of %d for %s): stored as F16", gguf_name,
                       cols, _block(new), new.name)
        new = Q.F16
    return new


def _block(qt) -> int:
    return gguf_module().GGML_QUANT_SIZES[qt][0]


# ------------------------------------------------------------------------------------ quantizers
def quantize(a: np.ndarray, qt) -> np.ndarray:
    """float32 (rows, cols) -> the raw blocks of type qt, (rows, bytes per row) uint8 (or f32/f16 arrays)."""
    gguf = gguf_module()
    Q = gguf.GGMLQuantizationType
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qt == Q.F32:
        return a
    if qt == Q.F16:
        return a.astype(np.float16)
    if qt in (Q.Q4_K, Q.Q6_K):
        blocks = a.reshape(-1, 256)
        out = _quantize_q4_k(blocks) if qt == Q.Q4_K else _quantize_q6_k(blocks)
        return out.reshape(a.shape[0], -1)
    return gguf.quants.quantize(a, qt)


F32 = np.float32


def _nearest_int(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)  # round half to even, like ggml's nearest_int


def _sum(a: np.ndarray) -> np.ndarray:
    """Row sums of (blocks, n) in float32, added left to right as ggml's C loops do (numpy's pairwise
    summation rounds differently, which would change a few blocks)."""
    out = a[:, 0].copy()
    for i in range(1, a.shape[1]):
        out += a[:, i]
    return out


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(d == 0, F32(1), d)


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per row of x (blocks, n): x ~ scale * L - m with codes L in 0..nmax, the weighted least-squares
    fit over nstep + 1 trial scales, each trial starting from the best min so far (ggml's
    make_qkx2_quants). Returns (scale, m, L)."""
    lo, hi = np.minimum(x.min(1), F32(0)), x.max(1)
    flat = hi == lo
    sum_w, sum_x = _sum(w), _sum(w * x)
    iscale = (F32(nmax) / _safe(hi - lo)).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    L = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best = _sum(w * (scale[:, None] * L + lo[:, None] - x) ** 2)
    mn = lo
    for step in range(nstep + 1):
        iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / _safe(hi - mn)).astype(F32)
        La = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        Lf = La.astype(F32)
        sum_l, sum_l2, sum_xl = _sum(w * Lf), _sum(w * Lf * Lf), _sum(w * Lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(D)
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(D)
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        this_scale = np.where(pos, sum_xl / _safe(sum_l2), this_scale)
        err = _sum(w * (this_scale[:, None] * Lf + this_min[:, None] - x) ** 2)
        better = (D > 0) & (err < best)
        L = np.where(better[:, None], La, L)
        best, scale, mn = np.where(better, err, best), np.where(better, this_scale, scale), np.where(better, this_min, mn)
    return np.where(flat, F32(0), scale).astype(F32), (-mn).astype(F32), np.where(flat[:, None], 0, L)


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 144) Q4_K blocks: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block
    scales / mins, 128 bytes of 4-bit codes; value = d * sc * q - dmin * m per 32-value sub-block."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    w = np.sqrt(_sum(sub * sub) / F32(32))[:, None] + np.abs(sub)  # ggml: av_x + |x|
    scales, mins, L = _qkx2(sub, w, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale, max_min = np.maximum(scales.max(1), F32(0)), np.maximum(mins.max(1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / _safe(max_scale), F32(0)).astype(F32)
    inv_min = np.where(max_min > 0, F32(63) / _safe(max_min), F32(0)).astype(F32)
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales).astype(np.uint8))  # (nb, 8)
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins).astype(np.uint8))
    d, dmin = (max_scale / F32(63)).astype(np.float16), (max_min / F32(63)).astype(np.float16)
    # 12-byte packing (ggml's get_scale_min_k4): sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales)
    # and 4-7 (mins); 4-7 split into the nibbles of bytes 8-11 and the top 2 bits of bytes 0-7
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], 1)
    dj = d.astype(F32)[:, None] * ls.astype(F32)  # (nb, 8)
    dm = dmin.astype(F32)[:, None] * lm.astype(F32)
    q = np.clip(_nearest_int((x.reshape(nb, 8, 32) + dm[..., None]) / _safe(dj)[..., None]), 0, 15)
    q = np.where((dj == 0)[..., None], L, q).astype(np.uint8).reshape(nb, 4, 2, 32)  # ggml keeps the fit's codes
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)  # each 64 values: 32 low nibbles, then 32 high
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), packed, qs], 1)


def _qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (blocks, n): a symmetric scale for codes in -nmax..nmax-1, weighted by x^2, the best
    of 19 trial scales (ggml's make_qx_quants, rmse_type 1). Returns (scale, codes + nmax)."""
    mx = x[np.arange(x.shape[0]), np.abs(x).argmax(1)]
    zero = np.abs(mx) < F32(1e-15)
    mxs = np.where(zero, F32(1), mx)
    w = x * x

    def trial(iscale):
        L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        Lf = L.astype(F32)
        return L, _sum(w * x * Lf), _sum(w * Lf * Lf)

    L, sumlx, suml2 = trial((-F32(nmax) / mxs).astype(F32))
    scale = np.where(suml2 > 0, sumlx / _safe(suml2), F32(0)).astype(F32)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        La, slx, sl2 = trial((-(F32(nmax) + F32(0.1) * F32(step)) / mxs).astype(F32))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / _safe(sl2)
        L = np.where(better[:, None], La, L)
        scale, best = np.where(better, new_scale, scale), np.where(better, new_scale * slx, best)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L + nmax)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 210) Q6_K blocks: 128 bytes of low 4 bits, 64 bytes of high 2 bits,
    16 int8 sub-block scales, fp16 d; value = d * scale_j * (q - 32) per 16-value sub-block."""
    nb = x.shape[0]
    scales, L0 = _qx(x.reshape(nb * 16, 16), 32)
    scales, L0 = scales.reshape(nb, 16), L0.reshape(nb, 16, 16)
    max_scale = scales[np.arange(nb), np.abs(scales).argmax(1)]
    empty = np.abs(max_scale) < F32(1e-15)
    iscale = (F32(-128) / np.where(empty, F32(1), max_scale)).astype(F32)
    d = np.where(empty, F32(0), F32(1) / iscale).astype(np.float16)
    sq = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)  # (nb, 16)
    dj = d.astype(F32)[:, None] * sq.astype(F32)
    L = np.clip(_nearest_int(x.reshape(nb, 16, 16) / _safe(dj)[..., None]), -32, 31) + 32
    L = np.where((dj == 0)[..., None], L0, L)  # ggml keeps the fit's codes where the scale rounds to 0
    L = np.where(empty[:, None, None], 0, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # (nb, half, quarter, 32)
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4), L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)],
                        axis=2).reshape(nb, 128)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    sq = np.where(empty[:, None], 0, sq).astype(np.int8)
    return np.concatenate([ql, qh.reshape(nb, 64), sq.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], 1)


# ---------------------------------------------------------------------------------- dequantizers
def _dequant_q8_k(raw: np.ndarray) -> np.ndarray:
    """Q8_K blocks (f32 d, 256 int8 codes, 16 int16 sums the dequantizer ignores) -> float32."""
    blocks = raw.reshape(-1, 292)
    d = blocks[:, :4].copy().view(np.float32)
    return (d * blocks[:, 4:260].copy().view(np.int8).astype(np.float32)).reshape(-1)


def dequantizable_types() -> list[str]:
    gguf = gguf_module()
    out = ["F32", "F16", "BF16", "F64", "Q8_K"]
    for qt in gguf.GGMLQuantizationType:
        cls = getattr(gguf.quants, qt.name, None)
        if qt.name not in out and isinstance(cls, type) and "dequantize_blocks" in vars(cls):
            out.append(qt.name)
    return out


def dequantize(t, source: str) -> torch.Tensor:
    """A GGUF reader tensor -> float32 torch tensor in (rows, cols) order (GGML lists dims fastest-first)."""
    gguf = gguf_module()
    Q = gguf.GGMLQuantizationType
    qt = Q(t.tensor_type)
    shape = tuple(int(d) for d in reversed(list(t.shape)))
    if qt.name not in dequantizable_types():
        raise GGUFError(f"{source}: tensor {t.name!r} has type {qt.name}, which lmstack cannot dequantize; "
                        f"supported: {dequantizable_types()}")
    raw = np.asarray(t.data)
    if qt == Q.F32:
        a = raw.astype(np.float32, copy=False)
    elif qt in (Q.F16, Q.F64):
        a = raw.astype(np.float32)
    elif qt == Q.Q8_K:
        a = _dequant_q8_k(raw.view(np.uint8))
    else:
        a = gguf.quants.dequantize(raw, qt)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(shape).copy())
