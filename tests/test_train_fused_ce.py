"""The fused linear + cross-entropy used by pretrain/SFT equals F.cross_entropy on full logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.train.fused_ce import fused_linear_nll, fused_quant_head_nll


@pytest.mark.parametrize("chunk", [3, 1000])
def test_value_and_gradients_match_full_logits(chunk):
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (2, 7))
    y[0, :3] = -100  # masked prompt
    y[1, -1] = -100
    ours = fused_linear_nll(h, w, y, chunk=chunk)
    gh, gw = torch.autograd.grad(2.5 * ours, (h, w))
    ref = F.cross_entropy((h @ w.T).reshape(-1, 50), y.reshape(-1), ignore_index=-100, reduction="sum")
    rh, rw = torch.autograd.grad(2.5 * ref, (h, w))
    torch.testing.assert_close(ours.double(), ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    assert gh[0, :3].abs().sum() == 0  # masked rows get no gradient


def test_frozen_weight_and_no_targets():
    torch.manual_seed(0)
    h = torch.randn(1, 4, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen (LoRA): no weight gradient is computed
    y = torch.tensor([[1, 2, 3, -100]])
    (gh,) = torch.autograd.grad(fused_linear_nll(h, w, y), (h,))
    (rh,) = torch.autograd.grad(F.cross_entropy((h @ w.T)[0], y[0], reduction="sum"), (h,))
    torch.testing.assert_close(gh, rh)
    none = fused_linear_nll(h, w, torch.full((1, 4), -100))
    assert none.item() == 0.0 and torch.autograd.grad(none, (h,))[0].abs().sum() == 0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 20\)"):
        fused_linear_nll(h, w, torch.tensor([[1, 2, 25, -100]]))


@pytest.mark.parametrize("budget", [1, 1 << 21])
def test_quantized_head_matches_its_dequantized_weight(budget):
    """The vocabulary-chunked loss for an NF4 head (QLoRA with quantize_embeddings) equals plain
    cross-entropy on the head's decoded weight, in value and in gradient w.r.t. the hidden states;
    budget=1 forces 64-row vocabulary chunks (and a short last chunk: V = 600)."""
    from lmstack.model.quant import NF4Linear

    torch.manual_seed(0)
    head = NF4Linear.from_linear(torch.nn.Linear(64, 600, bias=False), compute_dtype=torch.float64)
    h = torch.randn(2, 9, 64, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 600, (2, 9))
    y[0, :4] = -100
    y[1, 0] = 599  # the last vocabulary row, in the short last chunk
    ours = fused_quant_head_nll(h, head, y, budget=budget)
    (gh,) = torch.autograd.grad(1.5 * ours, (h,))
    w = head.dequantize(torch.float64)
    ref = F.cross_entropy((h @ w.T).reshape(-1, 600), y.reshape(-1), ignore_index=-100, reduction="sum")
    (rh,) = torch.autograd.grad(1.5 * ref, (h,))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, rh)
    assert gh[0, :4].abs().sum() == 0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 600\)"):
        fused_quant_head_nll(h, head, torch.full((2, 9), 600))


def test_token_logps_through_a_quantized_head():
    """RL / preference log-probs (losses.token_logps) through an NF4 head: the same values and hidden
    gradients as through its decoded dense weight, with a sampling temperature and ignored targets."""
    from lmstack.model.quant import NF4Linear
    from lmstack.train.losses import token_logps

    torch.manual_seed(0)
    head = NF4Linear.from_linear(torch.nn.Linear(64, 300, bias=False), compute_dtype=torch.float64)
    h = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 300, (3, 5))
    y[2, 3:] = -100
    g = torch.randn(3, 5, dtype=torch.float64)
    ours = token_logps(h, head, y, temperature=0.7)
    (gh,) = torch.autograd.grad((ours * g).sum(), (h,))
    ref = token_logps(h, head.dequantize(torch.float64), y, temperature=0.7)
    (rh,) = torch.autograd.grad((ref * g).sum(), (h,))
    torch.testing.assert_close(ours, ref.to(ours.dtype))
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    assert (ours[2, 3:] == 0).all() and gh[2, 3:].abs().sum() == 0
