"""Dequantize-in-the-GEMM kernels for lmstack's weight-only formats (model/quant.py), y = x W^T + b.

The weight stays in its storage format in HBM and is decoded tile by tile in registers, so a
decode step (a few rows of x) streams 4 or 8 bits per weight instead of 16. Formats, all in the
layouts lmstack already stores (no repacking at load):
  int8  q (N, K) int8, scale (N,) fp32:          W = q * scale[:, None]   (the scale is applied to
                                                 the fp32 accumulator, once per output column)
  int4  AutoAWQ "gemm" (lmstack's int4 and AWQ folders): qweight (K, N/8) int32 and qzeros
        (K/G, N/8) int32, 8 nibbles per word along N, nibble i holding column 8j + AWQ_ORDER[i];
        scales (K/G, N) fp16:                    W^T[k, n] = (q - z[k // G]) * s[k // G]
  nf4   flat codes of the row-major (N, K) matrix, 2 per byte (low nibble first), one absmax per
        64 weights, double-quantized: absmax = absmax_q (int8) * absmax_scale[block // 256] + offset;
                                                 W = NF4_CODEBOOK[code] * absmax[block]
Tiles: program (m, n, split) accumulates x[BLOCK_M, K-range] @ W^T[K-range, BLOCK_N] in fp32 with
tl.dot, decoding each (BLOCK_K, BLOCK_N) weight tile to x's dtype first. int4 tiles never straddle
a quantization group (BLOCK_K divides G), so each k-tile needs one row of zeros / scales; NF4 tiles
with K % 64 == 0 lie in one absmax block per column (ALIGNED), others decode the block per element.
Split-K for decode (M <= 16): an (N / BLOCK_N)-program grid cannot fill 132 SMs, so the K range is
cut into splits whose fp32 partial sums are added by one torch sum (deterministic, unlike atomics).
Because the split count depends on M only through "M <= 16", a row's result is the same for every
batch of up to 16 rows. Prefill-size M (> 16): one split, BLOCK_M 64 (the lead measures this
against dequantize + cuBLAS on the H200).
"""
import torch
import torch.nn.functional as F

from lmstack.kernels.cuda._triton import dot_precision, sm_count, tl, triton, usable
from lmstack.model.quant import (NF4_BLOCK, NF4_SCALE_BLOCK, QuantError, _nf4_levels, dequantize_int4, dequantize_int8,
                                 nf4_absmax, nf4_decode_flat, unpack_awq)

INT8, INT4_AWQ, NF4 = 0, 1, 2
DECODE_M = 16  # up to this many rows: BLOCK_M 16 and split-K


@triton.jit
def _nibble_shift(n):
    """Bit offset of column n's nibble in its AWQ word: column c = n % 8 sits in nibble
    (c % 2) * 4 + c // 2 (the inverse of AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7)."""
    c = n % 8
    return ((c % 2) * 4 + c // 2) * 4


@triton.jit
def _nf4_values(codes_ptr, amq_ptr, ams_ptr, lut_ptr, off_ptr, f, b, mask):
    """NF4 weights at flat indices f (any shape) with absmax block indices b (broadcastable)."""
    byte = tl.load(codes_ptr + f // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((f % 2) * 4).to(tl.int32)) & 15
    level = tl.load(lut_ptr + code)
    # the offset is read on the device (a 0-d tensor): no host sync per call, and CUDA-graph safe
    absmax = tl.load(amq_ptr + b).to(tl.float32) * tl.load(ams_ptr + b // 256) + tl.load(off_ptr)
    return level * absmax


@triton.jit
def _dequant_gemm_kernel(x_ptr, w_ptr, z_ptr, s_ptr, lut_ptr, off_ptr, bias_ptr, o_ptr,
                         M, N, K, stride_xm, group, k_per_split,
                         FMT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < M
    nmask = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_lo = ps * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_hi
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        wmask = kmask[:, None] & nmask[None, :]
        if FMT == 0:  # int8 (N, K): load the transposed tile directly
            q = tl.load(w_ptr + n[None, :].to(tl.int64) * K + k[:, None], mask=wmask, other=0)
            w = q.to(x.dtype)  # |q| <= 127: exact in fp16 / bf16
        elif FMT == 1:  # int4, AWQ gemm words (K, N / 8)
            shift = _nibble_shift(n)
            word = tl.load(w_ptr + k[:, None].to(tl.int64) * (N // 8) + (n // 8)[None, :], mask=wmask, other=0)
            q = (word >> shift[None, :]) & 15
            g = k0 // group  # the tile lies in one group (BLOCK_K divides the group size)
            z = (tl.load(z_ptr + g * (N // 8) + n // 8, mask=nmask, other=0) >> shift) & 15
            sc = tl.load(s_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
            w = ((q - z[None, :]).to(tl.float32) * sc[None, :]).to(x.dtype)
        else:  # NF4, flat row-major codes of W (N, K)
            f = n[None, :].to(tl.int64) * K + k[:, None]  # (BLOCK_K, BLOCK_N) flat indices
            if ALIGNED:  # K % 64 == 0 and BLOCK_K divides 64: one absmax block per column
                b = ((n.to(tl.int64) * K + k0) // 64)[None, :]
            else:
                b = f // 64
            w = _nf4_values(w_ptr, z_ptr, s_ptr, lut_ptr, off_ptr, f, tl.where(wmask, b, 0), wmask)
            w = w.to(x.dtype)
        acc += tl.dot(x, w, input_precision=PREC)
    if FMT == 0:
        acc = acc * tl.load(s_ptr + n, mask=nmask, other=0.0)[None, :]
    out_mask = mmask[:, None] & nmask[None, :]
    if SPLIT:  # fp32 partials (splits, M, N); the caller sums them and adds the bias
        tl.store(o_ptr + (ps * M + m[:, None]).to(tl.int64) * N + n[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptr + m[:, None].to(tl.int64) * N + n[None, :], acc, mask=out_mask)


@triton.jit
def _nf4_dequant_kernel(codes_ptr, amq_ptr, ams_ptr, lut_ptr, off_ptr, o_ptr, n_total, BLOCK: tl.constexpr):
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = f < n_total
    w = _nf4_values(codes_ptr, amq_ptr, ams_ptr, lut_ptr, off_ptr, f, tl.where(mask, f // 64, 0), mask)
    tl.store(o_ptr + f, w, mask=mask)


# ------------------------------------------------------------------------------------ references
def int8_linear_ref(x, qweight, scale, bias=None):
    return F.linear(x, dequantize_int8(qweight, scale, x.dtype), None if bias is None else bias.to(x.dtype))


def awq_dequantize_ref(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """AWQ gemm tensors -> W (N, K) through model/quant.py's unpacking and dequantization."""
    return dequantize_int4(unpack_awq(qweight).t(), scales, unpack_awq(qzeros), group_size, dtype)


def awq_linear_ref(x, qweight, qzeros, scales, group_size, bias=None):
    w = awq_dequantize_ref(qweight, qzeros, scales, group_size, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def nf4_dequantize_ref(t: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """model/quant.py's PyTorch NF4 decode (kernel=False: not the C++ CPU kernel)."""
    n = shape[0] * shape[1]
    return nf4_decode_flat(t["codes"], nf4_absmax(t), 0, n, dtype, kernel=False).view(shape)


def nf4_linear_ref(x, t, out_features, in_features, bias=None):
    w = nf4_dequantize_ref(t, (out_features, in_features), x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ------------------------------------------------------------------------------------------- API
def _offset(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["absmax_offset"].float().reshape(1)


def _split_k(x: torch.Tensor, n_tiles: int, K: int, block_k: int) -> int:
    """Decode-size M on a GPU: enough K splits for ~2 programs per SM, each >= 2 k-tiles."""
    if x.device.type != "cuda" or x.reshape(-1, K).shape[0] > DECODE_M:
        return 1
    sms = sm_count(x.device)
    return max(1, min(triton.cdiv(2 * sms, n_tiles), K // (2 * block_k), 32))


def _launch(fmt: int, x: torch.Tensor, w: torch.Tensor, z: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None,
            N: int, K: int, block_k: int, group: int = 1, nf4_offset: torch.Tensor | None = None, aligned: bool = False,
            split_k: int | None = None, block_n: int = 64) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    block_m = 16 if M <= DECODE_M else (32 if M <= 32 else 64)
    n_tiles = triton.cdiv(N, block_n)
    split = split_k or _split_k(x, n_tiles, K, block_k)
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k  # whole k-tiles (whole int4 groups)
    split = triton.cdiv(K, k_per_split)
    out = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else \
        torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        b = bias if bias is not None else out
        _dequant_gemm_kernel[(triton.cdiv(M, block_m), n_tiles, split)](
            x2, w, z, s, _nf4_levels(x.device), s if nf4_offset is None else nf4_offset, b, out, M, N, K, x2.stride(0),
            group, k_per_split,
            FMT=fmt, HAS_BIAS=bias is not None, SPLIT=split > 1, ALIGNED=aligned,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PREC=dot_precision(x.dtype), num_warps=4)
    if split > 1:
        out = out.sum(0)
        out = (out if bias is None else out + bias.float()).to(x.dtype)
    return out.view(*x.shape[:-1], N)


def _fast(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    return usable(x, *tensors) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                block_k: int = 64, split_k: int | None = None) -> torch.Tensor:
    """x (..., K) @ (q * scale)^T (+ bias) -> (..., N): q (N, K) int8, scale (N,) fp32."""
    N, K = qweight.shape
    extra = () if bias is None else (bias,)
    if not _fast(x, qweight, scale, *extra) or not qweight.is_contiguous():
        return int8_linear_ref(x, qweight, scale, bias)
    return _launch(INT8, x, qweight, qweight, scale.float().contiguous(), bias, N, K, block_k, split_k=split_k)


def int4_block_k(group_size: int, cap: int = 128) -> int:
    """The largest power of two <= cap dividing the group size (a k-tile never straddles a group);
    0 when that is below tl.dot's minimum of 16."""
    b = 1
    while group_size % (2 * b) == 0 and 2 * b <= cap:
        b *= 2
    return b if b >= 16 else 0


def awq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, block_k: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., N) from AWQ gemm tensors: qweight (K, N/8) int32, qzeros
    (K/G, N/8) int32, scales (K/G, N)."""
    K, N = qweight.shape[0], qweight.shape[1] * 8
    if scales.shape != (K // group_size, N) or qzeros.shape != (K // group_size, N // 8) or K % group_size:
        raise QuantError(f"awq_linear: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                         f"{tuple(scales.shape)} do not fit group size {group_size}")
    bk = block_k or int4_block_k(group_size)
    extra = () if bias is None else (bias,)
    if not bk or not _fast(x, qweight, qzeros, scales, *extra):
        return awq_linear_ref(x, qweight, qzeros, scales, group_size, bias)
    return _launch(INT4_AWQ, x, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), bias, N, K, bk,
                   group=group_size, split_k=split_k)


def _nf4_ok(t: dict[str, torch.Tensor], n: int) -> None:
    if t["codes"].numel() * 2 < n or t["absmax_q"].numel() * NF4_BLOCK < n:
        raise QuantError(f"NF4 tensors hold {t['codes'].numel() * 2} codes / {t['absmax_q'].numel()} blocks, "
                         f"too few for {n} weights")


def nf4_linear(x: torch.Tensor, t: dict[str, torch.Tensor], out_features: int, in_features: int,
               bias: torch.Tensor | None = None, block_k: int = 64, split_k: int | None = None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., N) from model/quant.py's NF4 tensors `t` (codes, absmax_q,
    absmax_scale, absmax_offset) of W (N, K)."""
    N, K = out_features, in_features
    _nf4_ok(t, N * K)
    extra = () if bias is None else (bias,)
    if not _fast(x, t["codes"], t["absmax_q"], t["absmax_scale"], *extra):
        return nf4_linear_ref(x, t, N, K, bias)
    aligned = K % NF4_BLOCK == 0 and NF4_BLOCK % block_k == 0
    assert NF4_SCALE_BLOCK == 256  # hard-coded in _nf4_values
    return _launch(NF4, x, t["codes"].contiguous(), t["absmax_q"].contiguous(), t["absmax_scale"].float().contiguous(),
                   bias, N, K, block_k, nf4_offset=_offset(t), aligned=aligned, split_k=split_k)


def nf4_dequantize(t: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """W (N, K) in `dtype` from NF4 tensors, decoded on the device (QLoRA's backward and prefill-size
    products: decode once, then one cuBLAS matmul)."""
    n = shape[0] * shape[1]
    _nf4_ok(t, n)
    if not (usable(t["codes"], t["absmax_q"], t["absmax_scale"]) and dtype in (torch.float16, torch.bfloat16, torch.float32)) \
            or (dtype == torch.bfloat16 and t["codes"].device.type == "cpu"):
        return nf4_dequantize_ref(t, shape, dtype)
    out = torch.empty(n, dtype=dtype, device=t["codes"].device)
    block = 1024
    _nf4_dequant_kernel[(triton.cdiv(n, block),)](t["codes"], t["absmax_q"], t["absmax_scale"].float().contiguous(),
                                                 _nf4_levels(out.device), _offset(t), out, n, BLOCK=block)
    return out.view(shape)
