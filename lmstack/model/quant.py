"""Weight-only quantization: int8 / int4 (RTN and AWQ's on-disk layout) / NF4, swapped in after build.

Formats (all weight-only; activations stay in float):
- int8: symmetric per-output-channel, w ~= q * s, q in [-127, 127], s = max|w_row| / 127.
- int4: group-wise asymmetric round-to-nearest along the input dimension, w ~= (q - z) * s with
  q, z in [0, 15]; on disk in AutoAWQ's "gemm" layout (so int4 RTN and AWQ share one format and
  the `-AWQ` checkpoints people download load here).
- NF4 (QLoRA, Dettmers et al. 2023): 16-value NormalFloat codebook, absmax blocks of 64, and the
  fp32 absmax constants double-quantized to 8 bits in blocks of 256 after subtracting their mean.

The QuantLinear modules replace `nn.Linear` by module name after the model is built (gpt-fast
style); the model file knows nothing of them. CPU kernels: `aten._weight_int8pack_mm` (int8) and
`aten._weight_int4pack_mm_for_cpu` (int4, tinygemm layout); everything else dequantizes + matmuls.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lmstack import cpu_kernels
from lmstack.config import ConfigError, ModelConfig
from lmstack.log import logger
from lmstack.model.layers import FusedLinears, cpu_has


class QuantError(ValueError):
    """A quantization request or quantized checkpoint lmstack cannot use (names layer / tensor / value)."""


METHODS = ("int8", "int4", "awq", "nf4")

# ---------------------------------------------------------------------------------------- int8
_INT8_MAX = 127
_MIN_SCALE = 1e-10  # an all-zero row still gets a positive scale, so "scale <= 0" always means corruption


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8, scale (N,) fp32 with w ~= q * scale[:, None]; |error| <= scale / 2."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / _INT8_MAX).clamp(min=_MIN_SCALE)  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


# ---------------------------------------------------------------------------------------- int4
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes aten's CPU int4 kernel accepts


def check_group_size(name: str, in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise QuantError(
            f"layer {name or '<linear>'}: group size {group_size} does not divide in_features {in_features}; "
            f"choose a group size that divides {in_features} (e.g. "
            f"{[g for g in (32, 64, 128, 256) if in_features % g == 0] or [in_features]})"
        )


def quantize_int4(w: torch.Tensor, group_size: int = 128, name: str = "",
                  scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) uint8 in [0, 15], scales (K/G, N) `scale_dtype`, zeros (K/G, N) uint8.

    w[n, k] ~= (q[n, k] - z[k // G, n]) * s[k // G, n]. The range is widened to include 0 so the zero
    point is exactly representable and every element's error is <= s / 2 (AutoAWQ clamps the zero
    point instead, which breaks the bound for all-positive groups). Scales are rounded to
    `scale_dtype` BEFORE q is computed, so dequantizing the stored tensors reproduces this exactly.
    """
    N, K = w.shape
    check_group_size(name, K, group_size)
    wg = w.detach().float().reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo = wg.amin(dim=2).clamp(max=0.0)
    hi = wg.amax(dim=2).clamp(min=0.0)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(scale_dtype).float()  # (N, K/G)
    zero = torch.round(-lo / scale).clamp(0, 15)  # (N, K/G)
    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, 15)
    return (q.reshape(N, K).to(torch.uint8), scale.t().contiguous().to(scale_dtype),
            zero.t().contiguous().to(torch.uint8))


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (N, K), scales / zeros (K/G, N) -> (N, K)."""
    s = scales.float().t().repeat_interleave(group_size, dim=1)  # (N, K)
    z = zeros.float().t().repeat_interleave(group_size, dim=1)
    return ((q.float() - z) * s).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) values in [0, 15] -> (..., K/2) uint8; element 2i in the low nibble, 2i+1 in the high."""
    if q.shape[-1] % 2:
        raise QuantError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (..., K/2) uint8 -> (..., K) uint8."""
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# AutoAWQ "gemm": 8 nibbles per int32 along the output dimension; nibble i (bits 4i..4i+3) holds
# column 8j + AWQ_ORDER[i] (checked against AutoAWQ / vLLM sources).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """(R, C) values in [0, 15] -> (R, C/8) int32 in AutoAWQ's nibble order."""
    R, C = q.shape
    if C % 8:
        raise QuantError(f"AWQ packing needs out_features divisible by 8, got {C}")
    q = q.to(torch.int64).reshape(R, C // 8, 8)[..., list(AWQ_ORDER)]  # (R, C/8, 8) in nibble order
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (q << shifts).sum(dim=-1)  # (R, C/8), < 2^32
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as int32
    return packed.to(torch.int32)


def unpack_awq(p: torch.Tensor) -> torch.Tensor:
    """(R, C/8) int32 -> (R, C) uint8, undoing AWQ_ORDER."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nib = (p.to(torch.int64)[..., None] >> shifts) & 15  # (R, C/8, 8): nibble i = column AWQ_ORDER[i]
    inv = [AWQ_ORDER.index(c) for c in range(8)]
    return nib[..., inv].reshape(p.shape[0], -1).to(torch.uint8)


def int4_to_awq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our (N, K) q + (K/G, N) scales/zeros -> AutoAWQ tensors (qweight, qzeros, scales)."""
    return {"qweight": pack_awq(q.t()), "qzeros": pack_awq(zeros), "scales": scales.to(torch.float16)}


# ----------------------------------------------------------------------------------------- NF4
# QLoRA appendix E: the 4-bit NormalFloat levels (quantiles of N(0, 1), asymmetric so 0 is exact,
# normalized to [-1, 1]).
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
NF4_BLOCK = 64
NF4_SCALE_BLOCK = 256


def quantize_nf4(w: torch.Tensor, block_size: int = NF4_BLOCK,
                 scale_block_size: int = NF4_SCALE_BLOCK) -> dict[str, torch.Tensor]:
    """Any-shape float -> {codes (ceil(n/2),) uint8, absmax_q (B,) int8, absmax_scale (B/256,) fp32,
    absmax_offset () fp32} with B = ceil(n / 64) blocks (the flat tensor is zero-padded).

    Double quantization (QLoRA sec. 3): the per-block fp32 absmax c2 are centred by their mean and
    stored as int8 with one fp32 scale per 256 blocks: 32/64 -> 8/64 + 32/(64*256) bits per weight.
    """
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % block_size
    if pad:
        flat = F.pad(flat, (0, pad))
    blocks = flat.view(-1, block_size)  # (B, 64)
    absmax = blocks.abs().amax(dim=1)  # (B,)
    normed = blocks / absmax.clamp(min=1e-12)[:, None]
    code = NF4_CODEBOOK.to(flat.device)
    # nearest level: midpoints between sorted levels, searchsorted gives the index
    mids = (code[1:] + code[:-1]) / 2
    codes = torch.bucketize(normed.reshape(-1), mids).to(torch.uint8)  # (B*64,)
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    # double quantization of absmax
    offset = absmax.mean()
    centred = absmax - offset
    nb = centred.numel()
    pad2 = (-nb) % scale_block_size
    cb = F.pad(centred, (0, pad2)).view(-1, scale_block_size)  # (B/256, 256)
    s2 = (cb.abs().amax(dim=1) / 127).clamp(min=_MIN_SCALE)  # (B/256,)
    q2 = torch.round(cb / s2[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[:nb]
    return {"codes": pack_int4(codes), "absmax_q": q2, "absmax_scale": s2, "absmax_offset": offset.reshape(())}


def nf4_absmax(t: dict[str, torch.Tensor], scale_block_size: int = NF4_SCALE_BLOCK,
               blocks: torch.Tensor | None = None) -> torch.Tensor:
    """The double-dequantized per-block absmax (B,) fp32; with `blocks` (int64 indices, any shape),
    only those blocks' (an embedding lookup needs a few rows, not the whole table's)."""
    if blocks is not None:
        return t["absmax_q"][blocks].float() * t["absmax_scale"].float()[blocks // scale_block_size] \
            + t["absmax_offset"].float()
    q2 = t["absmax_q"].float()
    s2 = t["absmax_scale"].float().repeat_interleave(scale_block_size)[: q2.numel()]
    return q2 * s2 + t["absmax_offset"].float()


def nf4_decode_flat(codes: torch.Tensor, absmax: torch.Tensor, start: int, n: int, dtype: torch.dtype,
                    kernel: bool = True) -> torch.Tensor:
    """n weights of a flat NF4 tensor from element `start`, (n,) in dtype: level[code] * absmax[block].
    The C++ kernel (csrc/nf4_decode.cpp: fp32 / bf16 on CPU) writes only the result; the PyTorch ops
    (elsewhere, or kernel=False) give bit-identical values."""
    if kernel:
        out = cpu_kernels.nf4_decode(codes, absmax, _nf4_levels(codes.device), start, n, dtype)
        if out is not None:
            return out
    b0, b1 = start // NF4_BLOCK, -(-(start + n) // NF4_BLOCK)  # the blocks the range overlaps
    c = codes[b0 * NF4_BLOCK // 2: b1 * NF4_BLOCK // 2]  # 2 codes per byte, 32 bytes per block
    # int32 indices and an in-place scale: ~8 bytes of temporaries per weight instead of ~14
    vals = _nf4_pair_lut(absmax.device).index_select(0, c.int()).view(-1, NF4_BLOCK)  # (b1 - b0, 64)
    vals = vals.mul_(absmax[b0:b1, None]).view(-1)[start - b0 * NF4_BLOCK: start - b0 * NF4_BLOCK + n]
    return vals.to(dtype)


def dequantize_nf4(t: dict[str, torch.Tensor], shape: Iterable[int], dtype: torch.dtype = torch.float32,
                   block_size: int = NF4_BLOCK, scale_block_size: int = NF4_SCALE_BLOCK) -> torch.Tensor:
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    if block_size != NF4_BLOCK:
        raise QuantError(f"NF4 block size {block_size} is not supported (only {NF4_BLOCK})")
    return nf4_decode_flat(t["codes"], nf4_absmax(t, scale_block_size), 0, n, dtype).view(shape)


def dequantize_nf4_rows(t: dict[str, torch.Tensor], row_len: int, start: int, end: int,
                        dtype: torch.dtype = torch.float32, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, end) of an NF4 (rows, row_len) matrix, (end - start, row_len): only the 64-weight
    blocks those rows touch are decoded (what a vocabulary-chunked LM head or an embedding lookup needs,
    never the whole 16-bit table). `absmax`: nf4_absmax(t), when the caller decodes many chunks."""
    absmax = nf4_absmax(t) if absmax is None else absmax
    flat = nf4_decode_flat(t["codes"], absmax, start * row_len, (end - start) * row_len, dtype)
    return flat.view(end - start, row_len)


_NF4_LUT: dict[torch.device, torch.Tensor] = {}
_NF4_LEVELS: dict[torch.device, torch.Tensor] = {}


def _nf4_levels(device: torch.device) -> torch.Tensor:
    lv = _NF4_LEVELS.get(device)
    if lv is None:
        lv = _NF4_LEVELS[device] = NF4_CODEBOOK.float().contiguous().to(device)
    return lv  # (16,)


def _nf4_pair_lut(device: torch.device) -> torch.Tensor:
    lut = _NF4_LUT.get(device)
    if lut is None:
        b = torch.arange(256)
        lut = _NF4_LUT[device] = torch.stack([NF4_CODEBOOK[b & 15], NF4_CODEBOOK[b >> 4]], dim=1).to(device)
    return lut  # (256, 2)


# --------------------------------------------------------------------------- load-time validation
def _check(name: str, t: torch.Tensor | None, shape: tuple[int, ...], source: str, positive: bool = False,
           nonneg: bool = False) -> torch.Tensor:
    if t is None:
        raise QuantError(f"{source}: tensor {name!r} is missing")
    if tuple(t.shape) != tuple(shape):
        raise QuantError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bad.any():
            raise QuantError(f"{source}: tensor {name!r} has {int(bad.sum())} non-finite values (NaN/inf): corrupted")
        if positive and (t <= 0).any():
            v = float(t[t <= 0].reshape(-1)[0])
            raise QuantError(f"{source}: tensor {name!r} has {int((t <= 0).sum())} scales <= 0 (e.g. {v}); "
                             "quantization scales are always positive: corrupted")
        if nonneg and (t < 0).any():
            raise QuantError(f"{source}: tensor {name!r} has negative values where none are possible: corrupted")
    return t


# ------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """Base: a frozen, weight-quantized replacement for nn.Linear (y = x W^T + b)."""

    method = ""
    # dtype fp32 activations are cast to for the int8/int4 CPU kernels (see _kernel_activations);
    # set_kernel_activation_dtype(model, None) keeps them fp32.
    act_dtype: torch.dtype | None = torch.bfloat16

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight these codes represent."""
        raise NotImplementedError

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under their on-disk suffixes (prefix `name.` is added by the caller)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def set_kernel_activation_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Activation dtype of every quantized linear's CPU kernel: torch.bfloat16 (fast), torch.int8
    (int8 layers only: W8A8, their default where supported; other layers use bf16) or None (fp32
    activations: results equal the dequantized-weight model's, several times slower)."""
    if dtype not in (None, torch.bfloat16, torch.int8):
        raise ValueError(f"kernel activation dtype must be torch.bfloat16, torch.int8 or None, got {dtype}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act_dtype = dtype if dtype != torch.int8 or isinstance(m, Int8Linear) else torch.bfloat16
    return model


def _kernel_input(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.device.type == "cpu" and not (
        torch.is_grad_enabled() and x.requires_grad)


def _kernel_activations(x: torch.Tensor, act_dtype: torch.dtype | None) -> torch.Tensor:
    """(..., K) -> (M, K) rows for the aten weight-only kernels; fp32 is cast to `act_dtype` (bf16 by
    default, see QuantLinear.act_dtype; None keeps fp32: exact w.r.t. the dequantized weights).

    Why bf16: aten's CPU int8/int4 weight-only kernels are vectorized for 16-bit activations only;
    with fp32 activations they take a scalar path that measured 7-30x slower (AVX2 EPYC: 4864x896,
    1 row: 2.2 ms fp32 vs 0.28 ms bf16). The weights are already 8/4-bit, so rounding activations to
    bf16 is well inside the quantization error (llama.cpp goes further: Q8_0/Q4_0 dot products
    quantize activations to int8). The output is cast back to the caller's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    return (x2.to(act_dtype) if x2.dtype == torch.float32 and act_dtype is not None else x2).contiguous()


def _onednn_int8_available() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "qlinear_prepack")
            and hasattr(ops, "qlinear_pointwise"))


_ONEDNN_INT8 = _onednn_int8_available()


def int8_activations_supported() -> bool:
    """Whether Int8Linear can run W8A8 (see Int8Linear._w8a8) with this PyTorch build."""
    return _ONEDNN_INT8


class Int8Linear(QuantLinear):
    """Symmetric per-output-channel int8 weights. On CPU three activation modes (act_dtype):
    - torch.int8 (default where oneDNN's quantized linear exists and the CPU has VNNI / AMX): W8A8,
      activations quantized per row on the fly, as llama.cpp's Q8_0 dot products do; see `_w8a8`;
    - torch.bfloat16: aten's weight-only int8 kernel with bf16 activations;
    - None: fp32 activations (results equal the dequantized-weight model's; slow)."""

    method = "int8"
    # W8A8 is the default where it is fast (measured on AMX); on AVX2-only CPUs it stays opt-in
    act_dtype: torch.dtype | None = (torch.int8 if _ONEDNN_INT8 and cpu_has("amx_int8", "avx512_vnni", "avx_vnni")
                                     else torch.bfloat16)

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("weight", qweight.to(torch.int8).contiguous())  # (N, K)
        self.register_buffer("weight_scale", scale.float().contiguous())  # (N,)
        self._scale_cache: dict[torch.dtype, torch.Tensor] = {}
        self._onednn: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, packed weight, zero points)

    def _w8a8(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) float rows -> (M, N) fp32 through oneDNN's int8 x int8 -> int32 product (AMX / VNNI).

        Each row is quantized with its own scale s_i = max|x_i| / 127: y_ij = s_i * w_j * sum_k
        round(x_ik / s_i) q_jk. oneDNN takes one activation scale per call, so it gets 1.0 and the
        rows are rescaled after; the integer sums are exact, so a row's result does not depend on the
        other rows of the batch. Why: aten's weight-only int8 kernel converts every weight to 16 bits
        and is compute-bound at one row (13 GB/s of weights on a Sapphire-Rapids-class Xeon, 4864x896
        layers streamed from memory: 0.33 ms); this streams the int8 weight at 21 GB/s (0.21 ms). The
        packed copy of the weight is kept next to the plain one (rebuilt if the buffer changes)."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._onednn is None or self._onednn[0] != key:
            self._onednn = (key, torch.ops.onednn.qlinear_prepack(self.weight, None),
                            torch.zeros(self.out_features, dtype=torch.int64))
        _, packed, zp = self._onednn
        xf = x2.float()
        s = xf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127  # (M, 1)
        xq = torch.round(xf / s).to(torch.int8)
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, self.weight_scale, zp, None, 1.0, 0,
                                               torch.float32, "none", [], "")
        return y.mul_(s)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        q, s = quantize_int8(lin.weight)
        return cls(q, s, lin.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _kernel_input(x):
            return self._fallback(x)
        global _ONEDNN_INT8
        if self.act_dtype == torch.int8 and _ONEDNN_INT8:
            try:
                y = self._w8a8(x.reshape(-1, x.shape[-1]).contiguous()).to(x.dtype)
                return self._add_bias(y.view(*x.shape[:-1], self.out_features))
            except RuntimeError as e:  # a oneDNN build or CPU that refuses it: weight-only from now on
                logger.warning("int8 W8A8 product unavailable (%s); using bf16 activations", e)
                _ONEDNN_INT8 = False
        x2 = _kernel_activations(x, torch.bfloat16 if self.act_dtype == torch.int8 else self.act_dtype)
        s = self._scale_cache.get(x2.dtype)
        if s is None:
            s = self._scale_cache[x2.dtype] = self.weight_scale.to(x2.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, s).to(x.dtype)
        return self._add_bias(y.view(*x.shape[:-1], self.out_features))

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "weight_scale": self.weight_scale}


class FusedInt8(FusedLinears):
    """Int8Linears that read the same input (q/k/v; gate/up) run as one W8A8 product at inference:
    one activation quantization and one oneDNN call instead of three (two). At one decode row the
    fixed cost of a call (quantizing the row, launching the kernel) is a sizeable part of its time.

    As in FusedLinears, the members keep their identity but their codes, scales and biases become
    slices of the fused ones: nothing is stored twice, and in-place writes reach the fused weight
    (views share the version counter its packed copy is keyed on). Used only while the group is
    intact and every member runs W8A8 (`set_kernel_activation_dtype` to bf16 or None switches back
    to the separate modules)."""

    def __init__(self, owner: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__(owner, names)  # codes and biases: slices of self.weight / self.bias
        scale = torch.cat([m.weight_scale for m in self.mods])
        start = 0
        for m, n in zip(self.mods, self.sizes):
            m.weight_scale.data = scale[start:start + n]
            start += n
        self.fused = Int8Linear(self.weight, scale)  # int8 and fp32 already: the same tensors, not copies
        self.fused.act_dtype = torch.int8

    def active(self) -> bool:
        return _ONEDNN_INT8 and self.intact() and all(m.act_dtype == torch.int8 for m in self.mods)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _int4_kernel_ok(out_features: int, group_size: int) -> bool:
    return out_features % 16 == 0 and group_size in _INT4_KERNEL_GROUPS and hasattr(
        torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4Linear(QuantLinear):
    """Group-wise asymmetric int4. Holds the weights once, in aten's CPU tinygemm layout when the
    kernel applies (out_features % 16 == 0, group in {32, 64, 128, 256}), else as plain nibbles."""

    method = "int4"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        N, K = q.shape
        super().__init__(K, N, bias)
        self.group_size = group_size
        self.kernel = _int4_kernel_ok(N, group_size)
        if self.kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        else:
            packed = pack_int4(q)
        self.register_buffer("qweight", packed)  # (N, K/2) uint8
        self.register_buffer("scales", scales.contiguous())  # (K/G, N)
        self.register_buffer("qzeros", zeros.to(torch.uint8).contiguous())  # (K/G, N)
        self._sz_cache: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 128, name: str = "") -> "Int4Linear":
        q, s, z = quantize_int4(lin.weight, group_size, name)
        return cls(q, s, z, group_size, lin.bias)

    def _scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        # tinygemm computes w = (q - 8) * s + zf, so our integer zero z maps to zf = (8 - z) * s.
        sz = self._sz_cache.get(dtype)
        if sz is None:
            s = self.scales.float()
            sz = torch.stack([s, (8 - self.qzeros.float()) * s], dim=-1).to(dtype).contiguous()  # (K/G, N, 2)
            self._sz_cache[dtype] = sz
        return sz

    def int_weight(self) -> torch.Tensor:
        """q (N, K) uint8 in [0, 15]."""
        if not self.kernel:
            return unpack_int4(self.qweight)
        return _tinygemm_unpack(self.qweight, self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.int_weight(), self.scales, self.qzeros, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.kernel and _kernel_input(x)):
            return self._fallback(x)
        x2 = _kernel_activations(x, self.act_dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size,
                                                       self._scales_and_zeros(x2.dtype)).to(x.dtype)
        return self._add_bias(y.view(*x.shape[:-1], self.out_features))

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        return int4_to_awq(self.int_weight(), self.scales, self.qzeros)


_TINYGEMM_PERM: dict[tuple[int, int], torch.Tensor] = {}


def _tinygemm_unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Recover q (N, K) from aten's CPU int4 layout. That layout is a fixed permutation of nibbles;
    we learn it once per shape by packing probe tensors whose nibbles spell each element's index."""
    perm = _TINYGEMM_PERM.get((N, K))
    if perm is None:
        idx = torch.arange(N * K, dtype=torch.int64)
        src = torch.zeros(N * K, dtype=torch.int64)
        digit = 0
        while (16 ** digit) < N * K:
            probe = ((idx >> (4 * digit)) & 15).view(N, K).to(torch.int32)
            nib = unpack_int4(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)).reshape(-1)
            src |= nib.to(torch.int64) << (4 * digit)
            digit += 1
        if not torch.equal(torch.sort(src).values, idx):
            raise QuantError("aten's int4 CPU packing is not a permutation of nibbles in this torch version")
        perm = _TINYGEMM_PERM[(N, K)] = src  # nibble position j holds element src[j]
    q = torch.empty(N * K, dtype=torch.uint8)
    q[perm] = unpack_int4(packed).reshape(-1)
    return q.view(N, K)


def _register_nf4(m: nn.Module, t: dict[str, torch.Tensor]) -> None:
    """NF4 codes and double-quantized scales as buffers (their on-disk names: weight, weight_absmax, ...)."""
    m.register_buffer("weight_codes", t["codes"].contiguous())
    m.register_buffer("weight_absmax", t["absmax_q"].contiguous())
    m.register_buffer("weight_absmax_scale", t["absmax_scale"].float().contiguous())
    m.register_buffer("weight_absmax_offset", t["absmax_offset"].float().reshape(()))


def _nf4_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return {"codes": m.weight_codes, "absmax_q": m.weight_absmax,
            "absmax_scale": m.weight_absmax_scale, "absmax_offset": m.weight_absmax_offset}


class NF4Linear(QuantLinear):
    """QLoRA's frozen NF4 base: dequantize to bf16 and matmul in bf16. Differentiable w.r.t. the
    input (a LoRA adapter wrapped around it trains); the codes themselves have no gradient."""

    method = "nf4"

    def __init__(self, t: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(in_features, out_features, bias)
        self.compute_dtype = compute_dtype
        _register_nf4(self, t)

    @classmethod
    def from_linear(cls, lin: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "NF4Linear":
        return cls(quantize_nf4(lin.weight), lin.in_features, lin.out_features, lin.bias, compute_dtype)

    _tensors = _nf4_tensors

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self._tensors(), (self.out_features, self.in_features), dtype)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype = torch.float32,
                        absmax: torch.Tensor | None = None) -> torch.Tensor:
        """Output rows [start, end) of the weight, (end - start, in): a vocabulary chunk of an LM head."""
        return dequantize_nf4_rows(self._tensors(), self.in_features, start, end, dtype, absmax)

    def absmax(self) -> torch.Tensor:
        return nf4_absmax(self._tensors())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _NF4Matmul.apply(x, self)
        cd = self.compute_dtype
        b = None if self.bias is None else self.bias.to(cd)
        return F.linear(x.to(cd), self.dequantize(cd), b).to(x.dtype)

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight_codes, "weight_absmax": self.weight_absmax,
                "weight_absmax_scale": self.weight_absmax_scale, "weight_absmax_offset": self.weight_absmax_offset}


class NF4Embedding(nn.Module):
    """A frozen token-embedding table stored as NF4 (QLoRA with `lora.quantize_embeddings`): a lookup
    decodes only the looked-up rows. With tied embeddings the output head is an NF4Linear sharing
    these very buffers (`tied_head`), so the (V, D) table exists once, at ~4.5 bits per weight."""

    def __init__(self, t: dict[str, torch.Tensor], num_embeddings: int, embedding_dim: int,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.compute_dtype = num_embeddings, embedding_dim, compute_dtype
        _register_nf4(self, t)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, compute_dtype: torch.dtype = torch.bfloat16) -> "NF4Embedding":
        return cls(quantize_nf4(emb.weight), emb.num_embeddings, emb.embedding_dim, compute_dtype)

    _tensors = _nf4_tensors

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self._tensors(), (self.num_embeddings, self.embedding_dim), dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        V, D = self.num_embeddings, self.embedding_dim
        if D % NF4_BLOCK:  # rows straddle blocks: decode the whole table (small models only)
            return F.embedding(ids, self.dequantize(self.compute_dtype))
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= V):
            raise IndexError(f"token id out of range [0, {V}) for the embedding table")
        per_row = D // NF4_BLOCK  # each row is exactly `per_row` blocks: gather them
        codes = self.weight_codes.view(V, D // 2)[flat]  # (N, D/2)
        blocks = flat[:, None] * per_row + torch.arange(per_row, device=flat.device)  # (N, D/64)
        absmax = nf4_absmax(self._tensors(), blocks=blocks)  # (N, D/64)
        vals = _nf4_pair_lut(codes.device).index_select(0, codes.reshape(-1).int()).view(-1, per_row, NF4_BLOCK)
        vals.mul_(absmax[..., None])  # (N, D/64, 64)
        return vals.view(*ids.shape, D).to(self.compute_dtype)  # (..., D)

    def tied_head(self) -> "NF4Linear":
        """An output projection (V, D) reading these same buffers (weight tying without a copy)."""
        return NF4Linear(self._tensors(), self.embedding_dim, self.num_embeddings, None, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, nf4"


@torch.no_grad()
def quantize_embeddings_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store the token embedding and the LM head as NF4 (frozen), in place. A tied head keeps sharing
    the embedding's codes; an untied one is quantized on its own."""
    emb = model.model.embed_tokens
    if not isinstance(emb, nn.Embedding):
        raise QuantError(f"model.embed_tokens is a {type(emb).__name__}, not an nn.Embedding: already quantized?")
    head = getattr(model, "lm_head", None)
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    new = NF4Embedding.from_embedding(emb, compute_dtype)
    model.model.embed_tokens = new
    if tied:
        model.lm_head = new.tied_head()
    elif isinstance(head, nn.Linear):
        model.lm_head = NF4Linear.from_linear(head, compute_dtype)
    return model


@torch.no_grad()
def dequantize_embeddings(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Undo quantize_embeddings_nf4 (after a QLoRA merge): dense nn.Embedding and head, re-tied if
    they shared codes. Other modules are left alone."""
    from lmstack.model.layers import Linear

    emb = model.model.embed_tokens
    if not isinstance(emb, NF4Embedding):
        return model
    head = getattr(model, "lm_head", None)
    tied = isinstance(head, NF4Linear) and head.weight_codes.data_ptr() == emb.weight_codes.data_ptr()
    dense = nn.Embedding(emb.num_embeddings, emb.embedding_dim, device=emb.weight_codes.device, dtype=dtype)
    dense.weight.data.copy_(emb.dequantize(dtype))
    dense.weight.requires_grad_(False)
    model.model.embed_tokens = dense
    if isinstance(head, NF4Linear):
        lin = Linear(head.in_features, head.out_features, bias=False, device=dense.weight.device, dtype=dtype)
        lin.weight = dense.weight if tied else nn.Parameter(head.dequantize(dtype), requires_grad=False)
        model.lm_head = lin
    return model


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T + b that saves nothing of W: backward dequantizes again for grad_x = grad_y W, so a
    QLoRA step never holds a 16-bit copy of every layer's weight between forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.in_dtype = layer, x.dtype
        cd = layer.compute_dtype
        b = None if layer.bias is None else layer.bias.to(cd)
        return F.linear(x.to(cd), layer.dequantize(cd), b).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        cd = ctx.layer.compute_dtype
        return (g.to(cd) @ ctx.layer.dequantize(cd)).to(ctx.in_dtype), None


# --------------------------------------------------------------------------------- model swapping
def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def quantizable_linears(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = 128, skip: Iterable[str] = ("lm_head",),
                   compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every nn.Linear (except `skip`) for its quantized version, in place; returns the model.

    method: int8 | int4 | nf4 ("awq" = int4 after lmstack.model.awq.apply_awq has rescaled the weights).
    All group sizes are checked before any module is replaced, so a bad one leaves the model intact.
    """
    if method not in METHODS:
        raise QuantError(f"quantization method {method!r} is not supported; choose one of {list(METHODS)}")
    names = quantizable_linears(model, skip)
    if method in ("int4", "awq"):
        for n in names:
            check_group_size(n, model.get_submodule(n).in_features, group_size)
    for n in names:
        lin = model.get_submodule(n)
        if method == "int8":
            new: QuantLinear = Int8Linear.from_linear(lin)
        elif method in ("int4", "awq"):
            new = Int4Linear.from_linear(lin, group_size, n)
            new.method = method
        else:
            new = NF4Linear.from_linear(lin, compute_dtype)
        _set_module(model, n, new)
    model.quant_method = method  # type: ignore[attr-defined]
    model.quant_group_size = group_size  # type: ignore[attr-defined]
    return model


# ------------------------------------------------------------------------------------- folder I/O
def quantization_config(method: str, group_size: int, skip: Iterable[str]) -> dict[str, Any]:
    """The `quantization_config` block of config.json. int4 and awq use AutoAWQ's gemm spelling."""
    skip = list(skip)
    if method in ("int4", "awq"):
        return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size,
                "zero_point": True, "modules_to_not_convert": skip or None, "lmstack_method": method}
    if method == "int8":
        return {"quant_method": "lmstack", "method": "int8", "bits": 8, "modules_to_not_convert": skip}
    return {"quant_method": "lmstack", "method": "nf4", "bits": 4, "block_size": NF4_BLOCK,
            "scale_block_size": NF4_SCALE_BLOCK, "modules_to_not_convert": skip}


def save_quantized(model: nn.Module, out_dir: str | Path, skip: Iterable[str] = ("lm_head",),
                   float_dtype: torch.dtype | None = None) -> None:
    """A quantized HF folder: config.json (+ quantization_config) and model.safetensors."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config  # type: ignore[assignment]
    if cfg.model_type == "gpt2":
        raise QuantError("saving quantized GPT-2 checkpoints is not supported (Conv1D layout); use llama/qwen/mistral")
    method = getattr(model, "quant_method", None)
    if method is None:
        raise QuantError("save_quantized: the model is not quantized (call quantize_model first)")
    quant_names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    sd: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        mod = name.rpartition(".")[0]
        if name.startswith("rotary.") or mod in quant_names and not name.endswith(".bias"):
            continue
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        sd[name] = t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t
    for n in quant_names:
        for suffix, t in model.get_submodule(n).disk_tensors().items():
            sd[f"{n}.{suffix}"] = t
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    floats = [t.dtype for t in sd.values() if t.is_floating_point()]
    dt = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(floats[0] if floats else torch.float32, "float32")
    d = cfg.replace(torch_dtype=dt).to_hf()
    d["quantization_config"] = quantization_config(method, getattr(model, "quant_group_size", 128), skip)
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    from lmstack.model.loading import _standalone  # buffers may be slices of a fused one (FusedInt8)

    save_file({k: _standalone(v.detach().cpu()) for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def _read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    from lmstack.checkpoint.safetensors_io import checkpoint_files, iter_safetensors

    out = {}
    for f in checkpoint_files(model_dir):
        for name, t in iter_safetensors(f):
            out[name] = t.clone()
    return out


def _build_module(name: str, kind: str, tensors: dict[str, torch.Tensor], lin: nn.Linear, qcfg: dict[str, Any],
                  source: str, compute_dtype: torch.dtype) -> QuantLinear:
    N, K = lin.out_features, lin.in_features
    bias = tensors.get(f"{name}.bias")
    if bias is not None:
        _check(f"{name}.bias", bias, (N,), source)
    elif lin.bias is not None:
        raise QuantError(f"{source}: tensor {name + '.bias'!r} is missing")
    if kind == "awq":
        G = int(qcfg.get("group_size", 128))
        if G == -1:
            G = K
        check_group_size(name, K, G)
        if N % 8:
            raise QuantError(f"{source}: layer {name}: AWQ needs out_features divisible by 8, got {N}")
        qw = _check(f"{name}.qweight", tensors.get(f"{name}.qweight"), (K, N // 8), source)
        qz = _check(f"{name}.qzeros", tensors.get(f"{name}.qzeros"), (K // G, N // 8), source)
        sc = _check(f"{name}.scales", tensors.get(f"{name}.scales"), (K // G, N), source, positive=True)
        return Int4Linear(unpack_awq(qw).t().contiguous(), sc, unpack_awq(qz), G, bias)
    if kind == "int8":
        q = _check(f"{name}.weight", tensors.get(f"{name}.weight"), (N, K), source)
        if q.dtype != torch.int8:
            raise QuantError(f"{source}: tensor {name + '.weight'!r} has dtype {q.dtype}, expected int8")
        s = _check(f"{name}.weight_scale", tensors.get(f"{name}.weight_scale"), (N,), source, positive=True)
        return Int8Linear(q, s, bias)
    # nf4
    nb = -(-N * K // NF4_BLOCK)
    t = {
        "codes": _check(f"{name}.weight", tensors.get(f"{name}.weight"), ((nb * NF4_BLOCK + 1) // 2,), source),
        "absmax_q": _check(f"{name}.weight_absmax", tensors.get(f"{name}.weight_absmax"), (nb,), source),
        "absmax_scale": _check(f"{name}.weight_absmax_scale", tensors.get(f"{name}.weight_absmax_scale"),
                               (-(-nb // NF4_SCALE_BLOCK),), source, positive=True),
        "absmax_offset": _check(f"{name}.weight_absmax_offset", tensors.get(f"{name}.weight_absmax_offset"),
                                (), source, nonneg=True),
    }
    absmax = nf4_absmax(t)
    # the int8 rounding of a centred absmax can dip below zero by at most half a step
    if (absmax < -t["absmax_scale"].max()).any():
        raise QuantError(f"{source}: tensor {name + '.weight_absmax'!r} decodes to negative block absmax: corrupted")
    return NF4Linear(t, K, N, bias, compute_dtype)


def load_quantized(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                   qcfg: dict[str, Any] | None = None, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A quantized HF folder (ours or AutoAWQ gemm) -> Transformer with QuantLinear modules, eval mode.

    Every scale tensor is validated (shape, finite, > 0) before it is used: a corrupted file is an
    error here, not garbage served later.
    """
    from lmstack.model.transformer import Transformer

    model_dir = Path(model_dir)
    source = str(model_dir)
    if qcfg is None:
        qcfg = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
        if qcfg is None:
            raise QuantError(f"{model_dir}/config.json has no quantization_config")
    qm = qcfg.get("quant_method")
    if qm == "awq":
        kind = "awq"
        if qcfg.get("version", "gemm").lower() != "gemm":
            raise QuantError(f"{source}: AWQ version {qcfg.get('version')!r} is not supported (only 'gemm')")
        if int(qcfg.get("bits", qcfg.get("w_bit", 4))) != 4:
            raise QuantError(f"{source}: AWQ bits {qcfg.get('bits')} is not supported (only 4)")
    elif qm == "lmstack" and qcfg.get("method") in ("int8", "nf4"):
        kind = qcfg["method"]
    else:
        raise QuantError(f"{source}: quantization_config quant_method {qm!r} (method {qcfg.get('method')!r}) is not "
                         "supported; supported: awq (gemm), lmstack int8 / nf4")
    if cfg.model_type == "gpt2":
        raise QuantError(f"{source}: quantized GPT-2 checkpoints are not supported")
    tensors = _read_all(model_dir)
    marker = {"awq": "qweight", "int8": "weight_scale", "nf4": "weight_absmax_scale"}[kind]
    qnames = sorted(k[: -len(marker) - 1] for k in tensors if k.endswith("." + marker))
    with torch.device("meta"):  # no random init of weights we are about to overwrite
        model = Transformer(cfg)
    for n in qnames:
        try:
            lin = model.get_submodule(n)
        except AttributeError:
            raise QuantError(f"{source}: quantized tensor {n}.{marker} names no module of {cfg.architecture}") from None
        if not isinstance(lin, nn.Linear):
            raise QuantError(f"{source}: {n} is not a Linear layer")
        _set_module(model, n, _build_module(n, kind, tensors, lin, qcfg, source, compute_dtype))
    if not qnames:
        raise QuantError(f"{source}: quantization_config says {kind} but no tensor ends in .{marker}")
    # Materialize the float modules only (QuantLinear buffers keep their exact dtypes).
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            m.to_empty(device="cpu", recurse=False)
            m._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    if model.rotary is not None:  # non-persistent buffers: recompute rather than load
        from lmstack.model.rope import RotaryEmbedding

        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    if cfg.tie_embeddings and cfg.head == "lm" and not isinstance(model.lm_head, QuantLinear):
        # a head quantized on its own (skip=() on a tied model) keeps its codes; re-tying would put
        # the float embedding where the int8 / int4 weight belongs
        model.lm_head.weight = model.model.embed_tokens.weight
    # The rest (embeddings, norms, unquantized heads) by name, through the common loader's checks.
    quant_keys = {k for n in qnames for k in tensors if k.startswith(n + ".")}
    rest = {k: v for k, v in tensors.items() if k not in quant_keys}
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    seen = set()
    for k, v in rest.items():
        if cfg.tie_embeddings and k == "lm_head.weight":
            continue
        p = params.get(k)
        if p is None:
            raise QuantError(f"{source}: unexpected tensor {k!r} for {cfg.architecture}")
        if tuple(p.shape) != tuple(v.shape):
            raise QuantError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(v.to(p.dtype) if p.is_floating_point() else v)
        seen.add(k)
    expected = {n for n, p in model.named_parameters() if not n.rpartition(".")[0] in qnames}
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - seen)
    if missing:
        raise QuantError(f"{source}: missing tensors ({len(missing)}): {', '.join(missing[:5])}")
    model.quant_method = "awq" if kind == "awq" and qcfg.get("lmstack_method") != "int4" else (
        "int4" if kind == "awq" else kind)  # type: ignore[attr-defined]
    model.quant_group_size = int(qcfg.get("group_size", 128))  # type: ignore[attr-defined]
    return model.eval()


def maybe_load_quantized(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype) -> nn.Module | None:
    """For the common loader: the quantized model if config.json has a quantization_config, else None."""
    try:
        qcfg = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None
    return None if qcfg is None else load_quantized(model_dir, cfg, dtype, qcfg)


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by parameters + buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
