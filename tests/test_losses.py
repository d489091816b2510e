"""Losses against hand-computed values from the papers' formulas (written here with math/torch,
never by calling the function under test), plus gradient-direction and equivalence checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmstack.train import losses as L


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# fixed preference batch: policy / reference summed log-probs
PC, PR, RC, RR = t(-10.0, -4.0), t(-12.0, -3.0), t(-11.0, -4.5), t(-11.5, -2.0)


def _h(i: int) -> float:
    return (PC[i].item() - RC[i].item()) - (PR[i].item() - RR[i].item())


# ------------------------------------------------------------------------------------------ DPO
def test_dpo_policy_equals_reference_is_log2():
    x = torch.randn(5, dtype=torch.float64) * 10
    y = torch.randn(5, dtype=torch.float64) * 10
    losses, m = L.dpo_loss(x, y, x.clone(), y.clone(), beta=0.3)
    assert torch.allclose(losses, torch.full((5,), math.log(2), dtype=torch.float64))
    assert m["rewards/margins"].item() == 0.0


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_sigmoid_by_hand(beta, eps):
    losses, m = L.dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    for i in range(2):
        h = _h(i)
        want = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
        assert losses[i].item() == pytest.approx(want, rel=1e-9)
    want_chosen = beta * ((-10 + 11) + (-4 + 4.5)) / 2
    assert m["rewards/chosen"].item() == pytest.approx(want_chosen)
    want_rej = beta * ((-12 + 11.5) + (-3 + 2)) / 2
    assert m["rewards/rejected"].item() == pytest.approx(want_rej)
    # pair 0: chosen reward 1.0β > rejected -0.5β ; pair 1: 0.5β > -1β
    assert m["rewards/accuracies"].item() == 1.0


def test_dpo_ipo_hinge_robust_by_hand():
    beta, eps = 0.2, 0.1
    ipo, _ = L.dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    hinge, _ = L.dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge")
    robust, _ = L.dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust", label_smoothing=eps)
    for i in range(2):
        h = _h(i)
        assert ipo[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2)
        assert hinge[i].item() == pytest.approx(max(0.0, 1 - beta * h))
        want = (-(1 - eps) * math.log(sig(beta * h)) + eps * math.log(sig(-beta * h))) / (1 - 2 * eps)
        assert robust[i].item() == pytest.approx(want)
    # hinge is exactly zero once β h >= 1
    z, _ = L.dpo_loss(t(0.0), t(-20.0), t(0.0), t(0.0), beta=0.1, loss_type="hinge")
    assert z.item() == 0.0
    # IPO minimum sits at h = 1/(2β), not at infinity
    lo, _ = L.dpo_loss(t(1 / (2 * beta)), t(0.0), t(0.0), t(0.0), beta=beta, loss_type="ipo")
    assert lo.item() == pytest.approx(0.0, abs=1e-12)


def test_dpo_robust_without_noise_equals_sigmoid():
    a, _ = L.dpo_loss(PC, PR, RC, RR, loss_type="robust")
    b, _ = L.dpo_loss(PC, PR, RC, RR, loss_type="sigmoid")
    assert torch.allclose(a, b)


def test_dpo_bad_input():
    with pytest.raises(ValueError, match="beta"):
        L.dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        L.dpo_loss(PC, PR, RC, t(1.0))
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)


# ------------------------------------------------------------------------------------------- RM
def test_bt_loss_by_hand():
    rc, rr = t(1.5, -0.5, 0.2), t(0.5, 0.5, 0.2)
    losses, m = L.bt_loss(rc, rr)
    for i in range(3):
        assert losses[i].item() == pytest.approx(-math.log(sig(rc[i].item() - rr[i].item())))
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)  # a tie is not a correct pair
    assert m["rewards/margins"].item() == pytest.approx((1.0 - 1.0 + 0.0) / 3)
    margin = t(0.3, 0.0, 1.0)
    losses, _ = L.bt_loss(rc, rr, margin=margin, center_coef=0.01)
    for i in range(3):
        c, r = rc[i].item(), rr[i].item()
        want = -math.log(sig(c - r - margin[i].item())) + 0.01 * (c + r) ** 2
        assert losses[i].item() == pytest.approx(want)


# ------------------------------------------------------------------------------------------ KTO
def test_kto_by_hand():
    pol, ref = t(-5.0, -7.0, -3.0), t(-6.0, -6.5, -3.0)
    labels = torch.tensor([True, False, True])
    beta, ld, lu, kl = 0.5, 1.0, 1.5, 0.4
    losses, m = L.kto_loss(pol, ref, labels, torch.tensor(kl), beta=beta, desirable_weight=ld,
                           undesirable_weight=lu)
    r = [1.0, -0.5, 0.0]
    want = [ld * (1 - sig(beta * (r[0] - kl))), lu * (1 - sig(beta * (kl - r[1]))),
            ld * (1 - sig(beta * (r[2] - kl)))]
    assert losses.tolist() == pytest.approx(want)
    assert m["rewards/chosen"].item() == pytest.approx(beta * (1.0 + 0.0) / 2)
    assert m["rewards/rejected"].item() == pytest.approx(beta * -0.5)
    # a negative KL estimate is clamped to 0
    neg, m2 = L.kto_loss(pol, ref, labels, -3.0, beta=beta)
    zero, _ = L.kto_loss(pol, ref, labels, 0.0, beta=beta)
    assert torch.allclose(neg, zero) and m2["kl"].item() == 0.0


def test_kto_kl_estimate_mismatched_pairs():
    pol_kl = torch.tensor([-4.0, -6.0, -5.0], requires_grad=True)
    ref_kl = torch.tensor([-5.0, -5.0, -5.5])
    z = L.kto_kl_estimate(pol_kl, ref_kl)
    assert z.item() == pytest.approx((1.0 - 1.0 + 0.5) / 3)
    assert not z.requires_grad
    assert L.kto_kl_estimate(ref_kl, pol_kl.detach()).item() == 0.0  # negative mean -> clamped


def test_kto_one_label_only():
    pol = torch.tensor([-5.0, -7.0], requires_grad=True)
    ref = torch.tensor([-6.0, -6.0])
    losses, m = L.kto_loss(pol, ref, torch.tensor([True, True]), 0.2)
    assert torch.isfinite(losses).all() and "rewards/rejected" not in m
    assert all(torch.isfinite(v).all() for v in m.values())
    losses.mean().backward()
    assert (pol.grad < 0).all()  # desirable-only: every log-prob is pushed up
    losses, m = L.kto_loss(pol.detach(), ref, torch.tensor([False, False]), 0.2)
    assert torch.isfinite(losses).all() and "rewards/chosen" not in m


# ----------------------------------------------------------------------------------------- ORPO
def _log_odds(p: float) -> float:
    return math.log(p / (1 - p))


def test_orpo_by_hand():
    pc, pr = t(-6.0, -2.0), t(-9.0, -1.0)
    lc, lr = t(3.0, 4.0), t(3.0, 2.0)
    lam = 0.25
    losses, m = L.orpo_loss(pc, pr, lc, lr, lam=lam)
    for i in range(2):
        P_c = math.exp(pc[i].item() / lc[i].item())
        P_r = math.exp(pr[i].item() / lr[i].item())
        ratio = _log_odds(P_c) - _log_odds(P_r)
        want = -pc[i].item() / lc[i].item() + lam * -math.log(sig(ratio))
        assert losses[i].item() == pytest.approx(want, rel=1e-5)


def test_orpo_odds_near_one_are_finite():
    for v in (0.0, -1e-9, -1e-7):
        pc = torch.tensor([v], requires_grad=True)
        pr = torch.tensor([-1.0], requires_grad=True)
        losses, m = L.orpo_loss(pc, pr, torch.tensor([5.0]), torch.tensor([5.0]))
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
        assert all(torch.isfinite(x) for x in m.values())
    # and the stable log(1 - e^x) agrees with the naive one where the naive one is accurate
    x = torch.tensor([-0.01, -0.5, -3.0, -30.0], dtype=torch.float64)
    assert torch.allclose(L.log1mexp(x), torch.log(1 - torch.exp(x)))


def test_orpo_rejects_empty_completion():
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.orpo_loss(t(-1.0), t(-1.0), t(0.0), t(1.0))


# ---------------------------------------------------------------------------------------- SimPO
def test_simpo_by_hand_and_length_normalization():
    beta, ratio = 2.0, 0.5
    pc, pr, lc, lr = t(-6.0, -20.0), t(-4.0, -9.0), t(3.0, 10.0), t(1.0, 3.0)
    losses, m = L.simpo_loss(pc, pr, lc, lr)  # paper defaults β=2, γ/β=0.5
    for i in range(2):
        z = beta * pc[i].item() / lc[i].item() - beta * pr[i].item() / lr[i].item() - beta * ratio
        assert losses[i].item() == pytest.approx(-math.log(sig(z)))
    # summed log-prob prefers the shorter rejected (-4 > -6), but per token chosen is better
    # (-2 > -4): SimPO ranks them by average, so the pair counts as correct
    assert m["rewards/accuracies"].item() == 1.0
    # doubling a response's length at the same per-token log-prob leaves the loss unchanged
    l2, _ = L.simpo_loss(2 * pc, pr, 2 * lc, lr)
    assert torch.allclose(l2, losses)


# ------------------------------------------------------------------ gradient direction checks
def _toy_policy(seed: int = 0):
    """A 'policy' over a 6-token vocabulary: logp of a sequence = sum of log_softmax(θ)[tokens]."""
    torch.manual_seed(seed)
    theta = torch.randn(6, requires_grad=True)
    chosen, rejected = torch.tensor([0, 1, 1]), torch.tensor([2, 3])

    def logps():
        lp = torch.log_softmax(theta, 0)
        return lp[chosen].sum()[None], lp[rejected].sum()[None]

    return theta, logps, torch.tensor([3.0]), torch.tensor([2.0])


@pytest.mark.parametrize("method", ["dpo", "ipo", "hinge", "robust", "orpo", "simpo", "kto"])
def test_one_sgd_step_prefers_chosen(method):
    theta, logps, lc, lr = _toy_policy()
    with torch.no_grad():
        ref_c, ref_r = (x.detach() for x in logps())
        before = (ref_c / lc - ref_r / lr).item(), (ref_c - ref_r).item()
    c, r = logps()
    if method in ("dpo", "ipo", "hinge", "robust"):
        eps = 0.1 if method == "robust" else 0.0
        loss, _ = L.dpo_loss(c, r, ref_c, ref_r, beta=0.1, loss_type="sigmoid" if method == "dpo" else method,
                             label_smoothing=eps)
    elif method == "orpo":
        loss, _ = L.orpo_loss(c, r, lc, lr)
    elif method == "simpo":
        loss, _ = L.simpo_loss(c, r, lc, lr)
    else:
        loss, _ = L.kto_loss(torch.cat([c, r]), torch.cat([ref_c, ref_r]), torch.tensor([True, False]), 0.0)
    loss.mean().backward()
    with torch.no_grad():
        theta -= 0.5 * theta.grad
        c, r = logps()
    after = (c / lc - r / lr).item(), (c - r).item()
    assert after[0] > before[0] and after[1] > before[1]


# ------------------------------------------------------------------------------------ PPO/GRPO
def test_ppo_policy_loss_and_clipfrac():
    old = torch.zeros(1, 4)
    # ratios e^0.5, e^-0.5, e^0.05, 1 ; advantages +1, -1, +1, -1
    new = torch.tensor([[0.5, -0.5, 0.05, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = L.ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
    # token 0: ratio 1.65 > 1.2 with A>0 -> clipped (-1.2); token 1: ratio .61 < .8 with A<0 ->
    # clipped (+0.8); token 2: inside -> -e^0.05; token 3 masked out
    want = (-1.2 + 0.8 - math.exp(0.05)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["clipfrac"].item() == pytest.approx(2 / 3)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0 and new.grad[0, 2] != 0 and new.grad[0, 3] == 0
    # pessimism: a ratio moving *against* the advantage is not clipped (A>0, ratio < 1-ε)
    _, m = L.ppo_policy_loss(torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    assert m["clipfrac"].item() == 0.0
    # no update yet: ratio 1, nothing clipped, approx_kl 0
    _, m = L.ppo_policy_loss(old, old, adv, mask)
    assert m["clipfrac"].item() == 0.0 and m["approx_kl"].item() == 0.0


def test_ppo_value_loss_by_hand():
    v = torch.tensor([[1.0, 2.0, 0.0]])
    old = torch.tensor([[0.0, 1.9, 0.0]])
    ret = torch.tensor([[2.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = L.ppo_value_loss(v, old, ret, mask, clip_range=0.2)
    # token 0: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 3.24 ; token 1: both 0 -> 0
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.0) / 2)
    assert m["vf_clipfrac"].item() == pytest.approx(0.5)


def test_grpo_loss_by_hand_token_vs_sequence():
    beta = 0.04
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]])
    old = torch.tensor([[-1.1, -2.0, -0.5], [-0.3, 0.0, 0.0]])
    ref = torch.tensor([[-1.2, -1.5, -0.5], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([0.7, -1.3])
    per = [[], []]
    for b in range(2):
        for j in range(3):
            if not mask[b, j]:
                continue
            rho = math.exp(logps[b, j].item() - old[b, j].item())
            a = adv[b].item()
            clipped = min(max(rho, 0.8), 1.2)
            d = ref[b, j].item() - logps[b, j].item()
            per[b].append(-min(rho * a, clipped * a) + beta * (math.exp(d) - d - 1))
    tok, m = L.grpo_loss(logps, old, adv, mask, ref_logps=ref, beta=beta, normalization="token")
    seq, _ = L.grpo_loss(logps, old, adv, mask, ref_logps=ref, beta=beta, normalization="sequence")
    assert tok.item() == pytest.approx(sum(per[0] + per[1]) / 4, rel=1e-5)
    assert seq.item() == pytest.approx((sum(per[0]) / 3 + per[1][0]) / 2, rel=1e-5)
    assert m["kl"].item() > 0
    # k3 is 0 when policy == reference, and the loss needs a reference when beta > 0
    _, m = L.grpo_loss(logps, None, adv, mask, ref_logps=logps, beta=beta)
    assert m["kl"].item() == 0.0 and m["clipfrac"].item() == 0.0
    with pytest.raises(ValueError, match="ref_logps"):
        L.grpo_loss(logps, None, adv, mask, beta=0.1)


def test_grpo_advantages_zero_mean_per_group():
    torch.manual_seed(0)
    r = torch.rand(4 * 8)
    r[8:16] = 1.0  # a constant group: advantage 0, not NaN
    a = L.grpo_advantages(r, 8)
    g = a.view(4, 8)
    assert torch.allclose(g.mean(1), torch.zeros(4), atol=1e-6)
    assert (g[1] == 0).all()
    r0 = r.view(4, 8)[0]
    assert torch.allclose(g[0], (r0 - r0.mean()) / (r0.std() + 1e-4))
    assert torch.allclose(L.grpo_advantages(r, 8, scale=False).view(4, 8)[0], r0 - r0.mean())
    with pytest.raises(ValueError, match="group_size >= 2"):
        L.grpo_advantages(r, 1)
    with pytest.raises(ValueError, match="multiple"):
        L.grpo_advantages(r[:7], 2)
    with pytest.raises(ValueError, match="NaN"):
        L.grpo_advantages(torch.tensor([1.0, float("nan")]), 2)


# ------------------------------------------------------------------------------------ GAE etc.
def _gae_reference(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [j for j in range(T) if mask[b, j]]
        last = 0.0
        for k in reversed(range(len(idx))):
            j = idx[k]
            v_next = values[b, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[b, j].item() + gamma * v_next - values[b, j].item()
            last = delta + gamma * lam * last
            adv[b, j] = last
    return adv, (adv + values.double()) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_reverse_loop(gamma, lam):
    torch.manual_seed(1)
    rewards, values = torch.randn(4, 9), torch.randn(4, 9)
    mask = torch.rand(4, 9) > 0.3
    mask[0] = False
    mask[0, 2:6] = True  # a contiguous response with padding on both sides
    adv, ret = L.gae(rewards, values, mask, gamma, lam)
    ra, rr = _gae_reference(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv.double(), ra, atol=1e-5) and torch.allclose(ret.double(), rr, atol=1e-5)


def test_masked_stats_and_whiten():
    torch.manual_seed(2)
    x = torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.4
    mask[0, 0] = mask[1, 1] = True
    sel = x[mask]
    assert L.masked_mean(x, mask).item() == pytest.approx(sel.mean().item(), rel=1e-5)
    assert L.masked_var(x, mask).item() == pytest.approx(sel.var().item(), rel=1e-5)
    w = L.whiten(x, mask)
    assert w[mask].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert w[mask].std().item() == pytest.approx(1.0, rel=1e-4)
    assert (w[~mask] == 0).all()
    w2 = L.whiten(x, mask, shift_mean=False)
    assert w2[mask].mean().item() == pytest.approx(sel.mean().item(), rel=1e-4)
    # empty rows give 0, not NaN
    assert L.masked_mean(x, torch.zeros_like(mask), dim=-1).eq(0).all()
    with pytest.raises(ValueError, match="at least 2"):
        L.masked_var(x, torch.zeros_like(mask))


# ---------------------------------------------------------------------------------- chunked NLL
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_nll_matches_cross_entropy(chunk):
    torch.manual_seed(3)
    N, D, V = 37, 16, 50
    h1 = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[[3, 10, 11]] = -100
    h2, w2 = h1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    ours = L.chunked_nll(h1, w1, y, chunk=chunk)
    ref = F.cross_entropy(h2 @ w2.t(), y, ignore_index=-100)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    ours.backward()
    ref.backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6) and torch.allclose(w1.grad, w2.grad, atol=1e-6)
    s = L.chunked_nll(h1, w1, y, chunk=chunk, reduction="sum")
    assert s.item() == pytest.approx(F.cross_entropy(h2 @ w2.t(), y, reduction="sum").item(), rel=1e-6)


def test_token_logps_weighted_grad_temperature_and_frozen_weight():
    torch.manual_seed(4)
    B, T, D, V = 2, 5, 8, 30
    h1 = torch.randn(B, T, D, requires_grad=True)
    w = torch.randn(V, D)  # frozen (e.g. LoRA base): no weight gradient is computed
    y = torch.randint(0, V, (B, T))
    y[1, -2:] = -100
    coef = torch.randn(B, T)
    lp = L.token_logps(h1, w, y, chunk=3, temperature=0.7)
    h2 = h1.detach().clone().requires_grad_()
    ref = L.logps_from_logits(h2 @ w.t(), y, temperature=0.7)
    direct = torch.log_softmax((h2.detach() @ w.t()) / 0.7, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(lp, ref, atol=1e-5)
    assert torch.allclose(lp[0], direct[0], atol=1e-5) and (lp[1, -2:] == 0).all()
    (lp * coef).sum().backward()
    (ref * coef).sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
    seq, n = L.sequence_logps(lp, y != -100)
    assert n.tolist() == [5.0, 3.0] and seq[1].item() == pytest.approx(lp[1, :3].sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        L.token_logps(h1, w, torch.full((B, T), V))


def test_chunked_nll_under_bf16_autocast_is_close():
    torch.manual_seed(5)
    h = torch.randn(20, 16)
    w = torch.randn(40, 16) * 0.3
    y = torch.randint(0, 40, (20,))
    ref = F.cross_entropy(h @ w.t(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = L.chunked_nll(h, w, y, chunk=8)
    assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) < 0.05
