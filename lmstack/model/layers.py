"""Norms, MLPs and activations shared by every family."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019). Statistics in fp32, then cast back before the weight
    multiply: exactly HF Llama's order, which matters for bf16 parity."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()


class Linear(nn.Linear):
    """nn.Linear whose CPU fp32 inference path calls oneDNN's inner product instead of MKL's sgemm.

    Why: at the small row counts of decoding (1-64 tokens per step) MKL's sgemm measured 1.2x
    (4864x896) to 2x (the 151936x896 LM head) slower than oneDNN's inner product on the AVX2 EPYC
    this was developed on, and decode time is almost all linear layers. It is the kernel PyTorch's
    own compiler (inductor) emits for frozen CPU linears. Training (grad enabled), other dtypes and
    other devices use F.linear unchanged; the weights are the same Parameters (no packed copy), so an
    engine running on a live training policy sees every update.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global _ONEDNN
        if (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_grad_enabled() and x.numel() and self.weight.is_contiguous()):
            try:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            except RuntimeError:  # an unusual build or shape oneDNN rejects: use the portable path from now on
                _ONEDNN = False
        return F.linear(x, self.weight, self.bias)


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
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))
