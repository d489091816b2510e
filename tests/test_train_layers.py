"""Training-time autograd Functions of the model layers (they save less for backward than autograd
would): the same forward values as the eager chain, and the same gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.model.layers import RMSNorm, _RMSNormFn, _SiluMulFn


def _eager_rms(x, w, eps):  # RMSNorm.forward's eager chain, differentiated by autograd
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


# the statistics are fp32 whatever x's dtype (HF Llama's order), so even fp64 agrees only to fp32 rounding
@pytest.mark.parametrize("dtype,weight_grad,tol", [(torch.float64, True, 1e-6), (torch.float32, True, 1e-5),
                                                   (torch.bfloat16, False, 2e-2), (torch.bfloat16, True, 2e-2)])
def test_rms_norm_function_matches_autograd(dtype, weight_grad, tol):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * 3).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_(weight_grad)
    g = torch.randn(3, 5, 64).to(dtype)
    ours = _RMSNormFn.apply(x, w, 1e-6)
    ref = _eager_rms(x, w, 1e-6)
    assert torch.equal(ours, ref)  # the forward is the eager chain, op for op
    want = (x, w) if weight_grad else (x,)
    got = torch.autograd.grad((ours * g).sum(), want)
    exp = torch.autograd.grad((ref * g).sum(), want)
    for a, b in zip(got, exp):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())
    # the module takes this path under autograd (inference keeps the plain chain / the C++ kernel)
    m = RMSNorm(64).to(dtype)
    with torch.no_grad():
        m.weight.copy_(w)
    out = m(x)
    assert type(out.grad_fn).__name__ == "_RMSNormFnBackward" and torch.equal(out, ref)


def test_rms_norm_function_saves_less():
    """What a LoRA step keeps for backward per norm: x in bf16 (+ one float per row), not an fp32 copy."""
    x = torch.randn(8, 256, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(64, dtype=torch.bfloat16)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(v for k, v in seen.items() if k not in (x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()))

    assert saved_bytes(lambda: _RMSNormFn.apply(x, w, 1e-6)) == 8 * 256 * 4  # r only: x and w are inputs
    assert saved_bytes(lambda: _eager_rms(x, w, 1e-6)) >= 8 * 256 * 64 * 4  # the fp32 copy of x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_function_is_bit_identical_to_autograd(dtype):
    torch.manual_seed(0)
    gate = torch.randn(4, 7, 96).to(dtype).requires_grad_()
    up = torch.randn(4, 7, 96).to(dtype).requires_grad_()
    g = torch.randn(4, 7, 96).to(dtype)
    ours = _SiluMulFn.apply(gate, up)
    ref = F.silu(gate) * up
    assert torch.equal(ours, ref)
    for a, b in zip(torch.autograd.grad((ours * g).sum(), (gate, up)), torch.autograd.grad((ref * g).sum(), (gate, up))):
        assert torch.equal(a, b)
