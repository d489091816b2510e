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


def _nearest_int(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)  # round half to even, like ggml's nearest_int


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Scale and min of each row of x (blocks, n): x ~ scale * L - min with L in 0..nmax, the weighted
    least-squares fit over nstep + 1 trial scales (ggml's make_qkx2_quants). Returns (scale, -min, L)."""
    f32 = np.float32
    lo = np.minimum(x.min(1), 0).astype(f32)
    hi = x.max(1)
    span = hi - lo
    flat = span == 0
    span_safe = np.where(flat, f32(1), span)
    sum_w = w.sum(1)
    sum_x = (w * x).sum(1)

    def fit(iscale):
        L = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        return L

    iscale = f32(nmax) / span_safe
    scale = 1 / iscale
    mn = lo.copy()
    L = fit(iscale)
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(1)
    for step in range(nstep + 1):
        iscale = (f32(rmin + rdelta * step + nmax) / span_safe).astype(f32)
        La = fit(iscale)
        Lf = La.astype(f32)
        sum_l, sum_l2, sum_xl = (w * Lf).sum(1), (w * Lf * Lf).sum(1), (w * Lf * x).sum(1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, f32(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        err = (w * (this_scale[:, None] * Lf + this_min[:, None] - x) ** 2).sum(1)
        better = ok & (err < best)
        L = np.where(better[:, None], La, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat[:, None], 0, L)
    return scale.astype(f32), (-mn).astype(f32), L


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 144) Q4_K blocks: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block
    scales / mins, 128 bytes of 4-bit codes; value = d * sc * q - dmin * m per 32-value sub-block."""
    f32 = np.float32
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av = np.sqrt((sub * sub).sum(1) / 32)
    w = av[:, None] + np.abs(sub)
    scales, mins, _ = _qkx2(sub, w, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = scales.max(1), mins.max(1)
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, 1), 0).astype(f32)
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, 1), 0).astype(f32)
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales)).astype(np.uint8)  # (nb, 8)
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins)).astype(np.uint8)
    d = (max_scale / 63).astype(np.float16)
    dmin = (max_min / 63).astype(np.float16)
    # 12-byte packing (ggml's get_scale_min_k4): sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales)
    # and 4-7 (mins); 4-7 split into low nibbles of bytes 8-11 and the top 2 bits of bytes 0-7
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    dj = d.astype(f32)[:, None] * ls.astype(f32)  # (nb, 8)
    dm = dmin.astype(f32)[:, None] * lm.astype(f32)
    xs = x.reshape(nb, 8, 32)
    q = np.clip(_nearest_int((xs + dm[..., None]) / np.where(dj == 0, 1, dj)[..., None]), 0, 15)
    q = np.where((dj == 0)[..., None], 0, q).astype(np.uint8).reshape(nb, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)  # 64 values per 32 bytes: low nibble first half
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), packed, qs], 1)


def _qx(x: np.ndarray, nmax: int) -> np.ndarray:
    """Symmetric scale of each row of x (blocks, n) for codes in -nmax..nmax-1, weighted by x^2, the
    best of 19 trial scales (ggml's make_qx_quants with rmse_type 1)."""
    f32 = np.float32
    idx = np.abs(x).argmax(1)
    mx = x[np.arange(x.shape[0]), idx]
    zero = np.abs(mx) < 1e-15
    mxs = np.where(zero, f32(1), mx)
    w = x * x

    def trial(iscale):
        L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(f32)
        return (w * x * L).sum(1), (w * L * L).sum(1)

    sumlx, suml2 = trial((-f32(nmax) / mxs).astype(f32))
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0).astype(f32)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        slx, sl2 = trial((-(f32(nmax) + f32(0.1) * step) / mxs).astype(f32))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / np.where(sl2 > 0, sl2, 1)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * slx, best)
    return np.where(zero, f32(0), scale).astype(f32)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 210) Q6_K blocks: 128 bytes of low 4 bits, 64 bytes of high 2 bits,
    16 int8 sub-block scales, fp16 d; value = d * scale_j * (q - 32) per 16-value sub-block."""
    f32 = np.float32
    nb = x.shape[0]
    scales = _qx(x.reshape(nb * 16, 16), 32).reshape(nb, 16)
    pick = np.abs(scales).argmax(1)
    max_scale = scales[np.arange(nb), pick]
    empty = np.abs(max_scale) < 1e-15
    iscale = np.where(empty, f32(0), f32(-128) / np.where(empty, f32(1), max_scale)).astype(f32)
    d = np.where(empty, f32(0), 1 / np.where(empty, f32(1), iscale)).astype(np.float16)
    sq = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)  # (nb, 16)
    dj = d.astype(f32)[:, None] * sq.astype(f32)
    xs = x.reshape(nb, 16, 16)
    L = np.clip(_nearest_int(xs / np.where(dj == 0, 1, dj)[..., None]), -32, 31) + 32
    L = np.where((dj == 0)[..., None], 32, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # halves of 128 x 4 rows
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4), L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)],
                        axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    out = [ql, qh.reshape(nb, 64), sq.view(np.uint8), d.view(np.uint8).reshape(nb, 2)]
    return np.concatenate(out, 1)


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
