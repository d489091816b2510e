"""Fused elementwise kernels for GPU inference: RMSNorm (+ residual add), silu(gate) * up, in-place RoPE.

Each replaces a chain of PyTorch ops that reads and writes the whole activation several times
(RMSNorm in eager mode: upcast, square, mean, rsqrt, two multiplies, downcast) with one pass over
HBM. They are memory-bound, so the gain is the bytes saved; the lead measures it on the H200
(scripts/gpu_check.sh). The signatures are those of lmstack's CPU kernels (cpu_kernels.py), and the
rounding follows the PyTorch chains they replace, so 16-bit results match the eager ops:
  rms_norm      w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), statistics in fp32 (HF Llama's order)
  add_rms_norm  s = x + y (rounded to x.dtype), then rms_norm(s); returns (s, normed)
  silu_mul      [gate | up] (..., 2I) -> silu(gate).to(dtype) * up (..., I)
  rope_         in place on the first `heads` heads of each row of a fused qkv output (..., W):
                x * cos + rotate_half(x) * sin, each product rounded to x.dtype as PyTorch does
No autograd: training keeps the model's PyTorch ops (model/layers.py has their memory-lean
backward passes).
"""
import torch
import torch.nn.functional as F

from lmstack.kernels.cuda._triton import pow2, tl, triton, usable
from lmstack.model.rope import apply_rope


@triton.jit
def _rms_norm_kernel(x_ptr, y_ptr, w_ptr, s_ptr, o_ptr, stride_x, stride_y, C, eps,
                     HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per row of C channels (C <= BLOCK_C: one tile holds the whole row, so the
    statistics need no second pass over HBM)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0)
    if HAS_RES:
        y = tl.load(y_ptr + row * stride_y + c, mask=mask, other=0.0)
        x = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)  # the residual stream, rounded as x + y
        tl.store(s_ptr + row * C + c, x, mask=mask)
    xf = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / C + eps)
    h = (xf * r).to(x.dtype).to(tl.float32)  # rounded to the activation dtype before the weight multiply
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * C + c, w * h, mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, o_ptr, stride_gu, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < I
    g = tl.load(gu_ptr + row * stride_gu + i, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + I + i, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    sg = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # F.silu's result, in the activation dtype
    tl.store(o_ptr + row * I + i, sg * u.to(tl.float32), mask=mask)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_x, heads,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One program per row: all `heads` heads as one (BLOCK_H, BLOCK_HALF) tile per half."""
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < heads) & (j[None, :] < HALF)
    p1 = x_ptr + row * stride_x + h[:, None] * (2 * HALF) + j[None, :]  # (BLOCK_H, BLOCK_HALF) first halves
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    cs = cos_ptr + row * (2 * HALF) + j
    sn = sin_ptr + row * (2 * HALF) + j
    c1 = tl.load(cs, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cs + HALF, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sn, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sn + HALF, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    dt = x1.dtype
    a1, b1 = x1.to(tl.float32), x2.to(tl.float32)
    # rotate_half(x) = [-x2, x1]: first half x1 c1 - x2 s1, second half x2 c2 + x1 s2 (products rounded)
    o1 = (a1 * c1).to(dt).to(tl.float32) + (-b1 * s1).to(dt).to(tl.float32)
    o2 = (b1 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)
    tl.store(p1, o1, mask=mask)
    tl.store(p1 + HALF, o2, mask=mask)


# ------------------------------------------------------------------------------------ references
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + y
    return s, rms_norm_ref(s, weight, eps)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


def rope_ref_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """In place through model/rope.py's apply_rope on the first `heads` heads of x (..., W)."""
    lead = x.shape[:-1]
    xh = x[..., : heads * head_dim].reshape(-1, 1, heads, head_dim)  # (R, 1, heads, D) a copy if not viewable
    rot = apply_rope(xh, cos.reshape(-1, 1, head_dim), sin.reshape(-1, 1, head_dim))
    x[..., : heads * head_dim] = rot.reshape(*lead, heads * head_dim)


# ------------------------------------------------------------------------------------------- API
def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (R, C) with a unit inner stride (a view where possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _fast(*tensors: torch.Tensor) -> bool:
    """The kernels apply: no gradient needed through them (they have no backward), Triton usable."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return usable(*tensors) and all(t.is_floating_point() for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., C); output dtype as PyTorch's (promote(weight, x))."""
    if not _fast(x, weight):
        return rms_norm_ref(x, weight, eps)
    x2 = _rows(x)
    R, C = x2.shape
    out = torch.empty(R, C, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if R:
        _rms_norm_kernel[(R,)](x2, x2, weight.contiguous(), x2, out, x2.stride(0), 0, C, float(eps),
                               HAS_RES=False, BLOCK_C=pow2(C), num_warps=4 if C <= 4096 else 8)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, rms_norm(x + y)): the residual add of a decoder layer and the next norm, one pass."""
    if not (_fast(x, y, weight) and x.dtype == y.dtype and x.shape == y.shape):
        return add_rms_norm_ref(x, y, weight, eps)
    x2, y2 = _rows(x), _rows(y)
    R, C = x2.shape
    s = torch.empty(R, C, dtype=x.dtype, device=x.device)
    out = torch.empty(R, C, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if R:
        _rms_norm_kernel[(R,)](x2, y2, weight.contiguous(), s, out, x2.stride(0), y2.stride(0), C, float(eps),
                               HAS_RES=True, BLOCK_C=pow2(C), num_warps=4 if C <= 4096 else 8)
    return s.view(x.shape), out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate | up] (..., 2I) -> silu(gate) * up (..., I)."""
    if not _fast(gate_up) or gate_up.shape[-1] % 2:
        return silu_mul_ref(gate_up)
    gu = _rows(gate_up)
    R, I = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(R, I, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, pow2(I))
    if R:
        _silu_mul_kernel[(R, triton.cdiv(I, block))](gu, out, gu.stride(0), I, BLOCK=block)
    return out.view(*gate_up.shape[:-1], I)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """In place: RoPE on the first `heads` heads (q then k of a fused qkv row) of x (..., W >= heads *
    head_dim); cos, sin (..., head_dim), one row per row of x (model/rope.py's rotate_half pairing)."""
    if head_dim % 2 or x.shape[-1] < heads * head_dim:
        raise ValueError(f"rope_: {heads} heads of {head_dim} do not fit a row of {x.shape[-1]} (head_dim must be even)")
    x2 = x.view(-1, x.shape[-1]) if x.stride(-1) == 1 else None  # must be a view: the rotation is in place
    if x2 is None or not _fast(x, cos, sin) or not (x.dtype == cos.dtype == sin.dtype):
        rope_ref_(x, cos, sin, heads, head_dim)
        return
    c2 = cos.reshape(-1, head_dim).contiguous()
    s2 = sin.reshape(-1, head_dim).contiguous()
    if c2.shape[0] != x2.shape[0]:
        raise ValueError(f"rope_: cos/sin have {c2.shape[0]} rows for {x2.shape[0]} rows of x")
    if x2.shape[0]:
        _rope_kernel[(x2.shape[0],)](x2, c2, s2, x2.stride(0), heads, HALF=head_dim // 2, BLOCK_H=pow2(heads, 2),
                                     BLOCK_HALF=pow2(head_dim // 2, 2))
