"""Norms, MLPs and activations shared by every family."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack import cpu_kernels


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019). Statistics in fp32, then cast back before the weight
    multiply: exactly HF Llama's order, which matters for bf16 parity."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.fast(x, self.weight):  # CPU inference: the same arithmetic in one C++ pass
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)  # training: saves less for backward
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm for training: the eager forward op for op (same values), but backward keeps only x and
    the per-row r = 1 / rms(x) (one float per row). Autograd would keep fp32 copies instead: x.float()
    (twice x's bytes for a bf16 residual stream, as under LoRA) and x̂ = x r when the weight trains.
    On SmolLM2-135M at 4,096 tokens per step that is 270-570 MiB of saved activations.

    With x̂ = x r and y = w ⊙ cast(x̂):  dL/dw = Σ_rows g ⊙ cast(x̂),  dL/dx̂ = g ⊙ w,
    dL/dx = r (dL/dx̂ - x̂ mean(dL/dx̂ ⊙ x̂))   (the mean over the normalized dimension)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        h = x.to(torch.float32)
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (h * r).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, weight, r = ctx.saved_tensors
        xhat = x.to(torch.float32) * r
        gx = gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gxhat = (g * weight).to(torch.float32)
            gx = (r * (gxhat - xhat * (gxhat * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return gx, gw, None


class _SiluMulFn(torch.autograd.Function):
    """silu(gate) * up for training, keeping gate and up only: silu(gate) is recomputed in backward
    (autograd would keep it too, a third (tokens, intermediate) tensor: 380 MiB on SmolLM2-135M at
    4,096 tokens in bf16). The same ops as autograd's, so values and gradients are bit-identical."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        g_gate = torch.ops.aten.silu_backward(g * up, gate) if ctx.needs_input_grad[0] else None
        g_up = g * F.silu(gate) if ctx.needs_input_grad[1] else None
        return g_gate, g_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; under autograd through _SiluMulFn (one activation fewer kept for backward)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMulFn.apply(gate, up)
    return F.silu(gate) * up


def cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists any of these CPU feature flags (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return False
    return any(x in info for x in flags)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, except CPU fp32 inference calls oneDNN's inner product instead of MKL's sgemm.

    Why: at the small row counts of decoding (1-64 tokens per step) MKL's sgemm measured 1.2x
    (4864x896) to 2x (the 151936x896 LM head) slower than oneDNN's inner product on the AVX2 EPYC
    this was developed on, and decode time is almost all linear layers. It is the kernel PyTorch's
    own compiler (inductor) emits for frozen CPU linears. Training (grad enabled), other dtypes and
    other devices use F.linear unchanged.
    """
    global _ONEDNN
    if (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and x.numel() and weight.is_contiguous()):
        try:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        except RuntimeError:  # an unusual build or shape oneDNN rejects: use the portable path from now on
            _ONEDNN = False
    return F.linear(x, weight, bias)


class PackedWeight:
    """oneDNN's blocked ("packed") copy of a bf16 weight for CPU inference, rebuilt whenever a source
    Parameter changes (an optimizer step or load_state_dict bumps its `_version`).

    Why: an unpacked bf16 weight is re-laid-out by oneDNN on every call, so a decode-size bf16 matmul
    moves the weight through memory twice. Packed once, the same products stream at 1.6-1.8x the speed
    (Sapphire-Rapids-class Xeon with AMX, single row: 9728x896 1.19 -> 0.67 ms, the 151936x896 LM
    head 14.7 -> 8.9 ms) and give bit-identical results (checked from 1 to 2048 rows with the packing
    hint below; a hint of 1 picks a layout that rounds differently from 64 rows on). The cost is a
    second copy of the weight, and in-place writes through `.data` (which bypass `_version`) are not
    seen: call `drop()` after those.
    """

    HINT = 1024  # batch-size hint for the blocked layout (see above)

    def __init__(self, from_fp32: bool = False) -> None:
        # from_fp32: also serve fp32 weights, packing a bf16 rounding of them (bf16 rollouts from an
        # fp32 policy: the linears run in bf16, everything else stays fp32; see `_project`)
        self.from_fp32 = from_fp32
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def drop(self) -> None:
        self._key = self._packed = None

    def get(self, weight: torch.Tensor, sources: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The packed copy of `weight`, rebuilt first if a source changed since it was made."""
        key = tuple((t.data_ptr(), t._version) for t in sources)
        if key != self._key:
            self._packed = None  # free the old copy before building the new one
            w = weight.detach().to(torch.bfloat16)  # no copy when already bf16
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w, self.HINT)
            self._key = key
        return self._packed

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               sources: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.get(weight, sources), bias, "none", [], "")


def _project(packed: PackedWeight | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             sources: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x W^T + b through the packed copy for bf16 CPU inference, else through `linear`.

    A `from_fp32` copy also serves fp32 inputs and weights: x is rounded to bf16, multiplied in bf16
    with fp32 accumulation, and the result (plus the fp32 bias) comes back in fp32."""
    if packed is not None and x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() > 0:
        if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
            return packed.linear(x, weight, bias, sources)
        if packed.from_fp32 and x.dtype == torch.float32 and weight.dtype == torch.float32:
            y = packed.linear(x.to(torch.bfloat16), weight, None, sources).float()
            return y if bias is None else y.add_(bias)
    return linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear running `linear` (oneDNN for CPU fp32 inference), or a PackedWeight for bf16 CPU
    inference once `pack_weights` gave it one. The Parameters stay the source of truth (no packed
    copy replaces them), so an engine running on a live training policy sees every update."""

    packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _project(self.packed, x, self.weight, self.bias, (self.weight,))


class FusedLinears:
    """Several Linears that read the same input (q/k/v; gate/up), run as one matmul at inference.

    Why: a decode step is weight-bandwidth bound, and one (1152 x 896) product streams the same bytes
    as three separate ones with a third of the calls and better prefetching (measured 0.34 ms vs
    0.42 ms per Qwen2.5-0.5B layer for q/k/v, 1.85 vs 1.93 ms for gate/up, single-row fp32).

    The member Parameters keep their identity (optimizers, LoRA and state_dict still see them) but
    their storage becomes a slice of one concatenated weight, so in-place updates (optimizer steps,
    load_state_dict) reach the fused weight too. Anything that replaces a member (a LoRA or
    quantized-linear swap) or its storage (`model.to(dtype)`) is detected by `active()`, and the
    caller falls back to the separate modules.
    Computation: one `linear` over the concatenated weight, split along the output features.
    """

    def __init__(self, owner: nn.Module, names: tuple[str, ...]) -> None:
        self.owner, self.names = owner, names
        self.mods: list[Linear] = [getattr(owner, n) for n in names]
        self.weight = torch.cat([m.weight.detach() for m in self.mods])  # (sum of out features, in features)
        has_bias = self.mods[0].bias is not None
        self.bias = torch.cat([m.bias.detach() for m in self.mods]) if has_bias else None
        self.sizes = [m.out_features for m in self.mods]
        start = 0
        for m, n in zip(self.mods, self.sizes):
            m.weight.data = self.weight[start:start + n]
            if has_bias:
                m.bias.data = self.bias[start:start + n]
            start += n
        self._ptrs = self._pointers()
        self.packed: PackedWeight | None = None

    def _pointers(self) -> list[tuple[int, int]]:
        return [(m.weight.data_ptr(), 0 if m.bias is None else m.bias.data_ptr()) for m in self.mods]

    def intact(self) -> bool:
        """Every member is still the module it was (no LoRA / quantized swap) and its storage is still
        its slice of the fused weight (no `.to(dtype)`)."""
        return all(getattr(self.owner, n) is m for n, m in zip(self.names, self.mods)) and self._pointers() == self._ptrs

    def active(self) -> bool:
        """Use the fused path: inference (autograd keeps the separate Parameters) and intact."""
        return not torch.is_grad_enabled() and self.intact()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The members' outputs side by side (..., sum of out features)."""
        return _project(self.packed, x, self.weight, self.bias, tuple(m.weight for m in self.mods))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.project(x).split(self.sizes, dim=-1)


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v of every attention layer and gate/up of every gated MLP (see FusedLinears; int8
    members: quant.FusedInt8).
    Call after the model is on its final device and dtype. Returns how many groups were fused."""
    from lmstack.model.quant import FusedInt8, Int8Linear  # int8 members fuse too (W8A8)

    n = 0
    for mod in model.modules():
        groups = getattr(mod, "FUSABLE", ())
        for attr, names in groups:
            members = [getattr(mod, x, None) for x in names]
            kind = {type(m) for m in members}
            if kind not in ({Linear}, {Int8Linear}):
                continue
            if len({(m.weight.dtype, m.weight.device, m.in_features, m.bias is None) for m in members}) != 1:
                continue
            setattr(mod, attr, (FusedLinears if kind == {Linear} else FusedInt8)(mod, names))
            n += 1
    return n


def bf16_packing_supported() -> bool:
    return _ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _projections(model: nn.Module):
    """Every Linear and FusedLinears of the model: the things that can hold a PackedWeight."""
    for mod in model.modules():
        if type(mod) is Linear:
            yield mod
        for attr, _ in getattr(mod, "FUSABLE", ()):
            if type(getattr(mod, attr)) is FusedLinears:  # not quant.FusedInt8: int8, no bf16 copy
                yield getattr(mod, attr)


def pack_weights(model: nn.Module, from_fp32: bool = False) -> int:
    """Give every Linear and FusedLinears a PackedWeight (used for bf16 CPU inference; packing itself
    happens lazily on the first such call). `from_fp32`: an fp32 model's linears then also run in bf16
    at inference (see `_project`). Returns how many were given one; 0 where oneDNN's bf16 path is
    unavailable."""
    if not bf16_packing_supported():
        return 0
    n = 0
    for p in _projections(model):
        if p.packed is None or p.packed.from_fp32 != from_fp32:
            p.packed = PackedWeight(from_fp32)
            n += 1
    return n


def drop_packed_weights(model: nn.Module) -> None:
    """Forget every packed copy (they are rebuilt on next use), e.g. after writes through `.data`."""
    for p in _projections(model):
        if p.packed is not None:
            p.packed.drop()


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rms" else nn.LayerNorm(dim, eps=eps)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTS = {
    "silu": F.silu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def get_act(name: str):
    if name not in _ACTS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTS)}")
    return _ACTS[name]


class MLP(nn.Module):
    """Gated (SwiGLU: down(act(gate(x)) * up(x))) or plain two-layer (GPT-2: down(act(up(x))))."""

    FUSABLE = (("_fused_gate_up", ("gate_proj", "up_proj")),)
    _fused_gate_up: FusedLinears | None = None  # or quant.FusedInt8 when gate/up are int8

    def __init__(self, dim: int, hidden: int, act: str, gated: bool, bias: bool) -> None:
        super().__init__()
        self.gated = gated
        if gated:
            self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)
        self.act = get_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            f = self._fused_gate_up
            if f is not None and f.active():
                gu = f.project(x)  # (..., 2 * hidden): [gate | up]
                if self.act is F.silu and cpu_kernels.fast(gu):
                    return self.down_proj(cpu_kernels.silu_mul(gu))
                g, u = gu.split(f.sizes, dim=-1)
                return self.down_proj(self.act(g) * u)
            if self.act is F.silu:
                return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))
