"""Losses as pure functions on tensors (DESIGN.md: a loss never reads a config).

Conventions shared by every function here:
- Preference / KTO / ORPO / SimPO losses take *per-sequence summed* log-probs of the completion
  tokens, shape (B,), and (where the method normalizes by length) the completion token counts.
- Each returns ``(losses, metrics)``: ``losses`` is per-example, shape (B,) (the caller reduces,
  usually with ``.mean()``), except the token-level RL losses (``ppo_policy_loss``,
  ``ppo_value_loss``, ``grpo_loss``) which return the already-normalized scalar.
- ``metrics`` maps names users watch (``rewards/chosen``, ``rewards/margins``, ``kl``,
  ``clipfrac`` ...) to detached 0-d tensors (batch means); call ``.item()`` when logging.
  A metric over an empty subset (e.g. KTO's undesirable rewards in an all-desirable batch) is
  left out rather than reported as NaN.
- Inputs are validated where it is cheap (shapes, beta > 0, group sizes); nothing here returns a
  NaN for finite inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]

__all__ = [
    "chunked_nll", "nll_loss", "token_logps", "logps_from_logits", "sequence_logps",
    "bt_loss", "dpo_loss", "kto_loss", "kto_kl_estimate", "orpo_loss", "simpo_loss",
    "ppo_policy_loss", "ppo_value_loss", "grpo_loss", "grpo_advantages", "gae", "whiten",
    "masked_mean", "masked_var", "log1mexp",
]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _same_shape(**tensors: torch.Tensor | None) -> None:
    items = [(k, t) for k, t in tensors.items() if t is not None]
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape:
            raise ValueError(f"shape mismatch: {name0} has shape {tuple(t0.shape)} but {name} has "
                             f"shape {tuple(t.shape)}")


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean()


# --------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is true (all positions when mask is None).

    With ``dim`` the mean is taken along that dimension. An empty selection gives 0, not NaN
    (an empty completion contributes nothing instead of poisoning the batch).
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    _same_shape(x=x, mask=mask)
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance of the selected entries of ``x`` (Bessel-corrected when ``unbiased``)."""
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    _same_shape(x=x, mask=mask)
    m = mask.to(x.dtype)
    n = m.sum()
    need = 2 if unbiased else 1
    if n.item() < need:
        raise ValueError(f"masked_var needs at least {need} selected element(s), got {int(n.item())}")
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    if unbiased:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the selected entries; with ``shift_mean=False`` the mean is added back
    (used for PPO rewards: rescale without moving their level). Unselected entries come back as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(out.dtype)


# --------------------------------------------------------------------------------------------
# log-probs: chunked linear + log-softmax + gather, never the full (N, V) logits at once
# --------------------------------------------------------------------------------------------
class _ChunkedTargetLogProb(torch.autograd.Function):
    """logp[i] = (h_i W^T / T)[y_i] - logsumexp(h_i W^T / T), computed ``chunk`` rows at a time.

    Forward keeps only the per-row logsumexp (N floats); backward recomputes each chunk's logits,
    so peak extra memory is O(chunk * V) instead of O(N * V) (the trick behind Liger's fused
    linear cross entropy). d logp_i / d logits_i = onehot(y_i) - softmax(logits_i).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, temperature: float, compute_dtype):
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        w = weight.to(compute_dtype)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk].to(compute_dtype)
            logits = (h @ w.t()).float()  # (C, V)
            if temperature != 1.0:
                logits.div_(temperature)
            lse_c = torch.logsumexp(logits, dim=-1)
            lse[s:s + chunk] = lse_c
            out[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse_c
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.temperature, ctx.compute_dtype = chunk, temperature, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, temperature, cdt = ctx.chunk, ctx.temperature, ctx.compute_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(cdt)
        grad_out = grad_out.float()
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(cdt)
            logits = (h @ w.t()).float()  # (C, V), recomputed
            if temperature != 1.0:
                logits.div_(temperature)
            # g_logits = g * (onehot - p), built in place in the logits buffer as -(g * (p - onehot))
            p = logits.sub_(lse[s:s + chunk, None]).exp_()
            p.scatter_add_(1, targets[s:s + chunk, None], torch.full_like(lse[s:s + chunk, None], -1.0))
            p.mul_(-grad_out[s:s + chunk, None] / temperature)
            g = p.to(cdt)
            if need_h:
                grad_h[s:s + chunk] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w += (g.t() @ h).float()
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # Respect an enclosing autocast region (the matmul runs in its dtype, softmax in float32);
    # the Function itself runs with autocast's casts made explicit.
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                temperature: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
    """Per-token log-probs log softmax(h W^T / temperature)[target], computed chunk-wise.

    hidden: (..., D) final hidden states; weight: (V, D) lm_head weight, or a frozen quantized head
    (NF4Linear, see sft.lm_head_for_loss); targets: (...) int64.
    Returns float32 (...) log-probs; positions whose target is ``ignore_index`` give 0 and no
    gradient. Peak memory is O(chunk * V) in forward and backward. ``temperature`` matches the
    sampling temperature (RL log-probs of sampled tokens must use the sampling distribution).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)} needs targets of shape "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if hasattr(weight, "dequantize_rows"):  # a frozen quantized head (QLoRA with NF4 embeddings)
        return _quantized_head_logps(hidden, weight, targets, temperature, ignore_index)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _positive("temperature", temperature)
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    y = targets.reshape(-1)
    valid = y != ignore_index
    if ((y[valid] < 0) | (y[valid] >= weight.shape[0])).any():
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")
    out = _ChunkedTargetLogProb.apply(h, weight, torch.where(valid, y, 0), chunk, float(temperature),
                                      _compute_dtype(hidden, weight))
    return (out * valid).reshape(lead)


def _quantized_head_logps(hidden: torch.Tensor, head, targets: torch.Tensor, temperature: float,
                          ignore_index: int) -> torch.Tensor:
    """token_logps through a quantized head, decoded a vocabulary chunk at a time (fused_ce)."""
    from lmstack.train.fused_ce import quant_head_logps

    _positive("temperature", temperature)
    y = targets.reshape(-1)
    valid = y != ignore_index
    if ((y[valid] < 0) | (y[valid] >= head.out_features)).any():
        raise ValueError(f"targets must lie in [0, {head.out_features}) or equal ignore_index={ignore_index}")
    out = quant_head_logps(hidden.reshape(-1, hidden.shape[-1]), head, torch.where(valid, y, 0), temperature)
    return (out.float() * valid).reshape(targets.shape)


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of ``hidden @ weight.T`` against ``targets`` without full-vocabulary logits.

    Equals ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=..., reduction=...)`` in value
    and gradient, with O(chunk * V) peak memory. reduction: "mean" (over non-ignored tokens; 0 when
    there are none), "sum" or "none".
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    nll = -token_logps(hidden, weight, targets, chunk=chunk, ignore_index=ignore_index)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / (targets != ignore_index).sum().clamp(min=1)


# The causal-LM loss used by pretraining and SFT is exactly the chunked NLL.
nll_loss = chunked_nll


def logps_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs from materialized logits (..., V); the unchunked reference path."""
    valid = targets != ignore_index
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    out = lp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return out * valid


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token log-probs + (B, T) completion mask -> per-sequence summed log-probs (B,) and
    token counts (B,): the inputs every preference loss below takes."""
    _same_shape(token_logps=token_logps, mask=mask)
    m = mask.to(token_logps.dtype)
    return (token_logps * m).sum(-1), m.sum(-1)


# --------------------------------------------------------------------------------------------
# reward model
# --------------------------------------------------------------------------------------------
def bt_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None,
            center_coef: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, eq. 1; Bradley & Terry 1952).

        loss = -log σ(r(x, y_w) - r(x, y_l) - m) + η (r(x, y_w) + r(x, y_l))²

    ``margin`` m: optional per-pair preference strength (Llama 2's margin loss, Touvron et al. 2023).
    ``center_coef`` η: the reward-centering term of Eisenstein et al. 2023 ("Helping or Herding?"),
    which pins the otherwise free additive constant of the rewards near 0 (0.01 is typical).
    """
    _same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef > 0:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    margins = (chosen_rewards - rejected_rewards).detach()
    metrics = {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(margins),
        "rewards/accuracies": _mean(margins > 0),
    }
    return losses, metrics


# --------------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------------
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization and its variants on the implicit-reward margin.

    With h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]:

    - "sigmoid" (Rafailov et al. 2023, eq. 7), with label smoothing ε (conservative DPO):
        loss = -(1-ε) log σ(β h) - ε log σ(-β h)
    - "robust" (Chowdhury et al. 2024, provably robust DPO, unbiased under flip rate ε < 1/2):
        loss = [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε)
    - "hinge" (SLiC, Zhao et al. 2023): loss = max(0, 1 - β h)
    - "ipo" (Azar et al. 2023, with τ = β): loss = (h - 1/(2β))²; IPO is usually run on
      length-averaged log-probs; pass averaged or summed ones as you intend.

    The implicit rewards r = β (log π - log π_ref) are reported as rewards/chosen, rewards/rejected.
    """
    _same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    _positive("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' or 'robust', not {loss_type!r}")

    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": _mean(chosen_rewards > rejected_rewards),
        "logps/chosen": _mean(policy_chosen_logps),
        "logps/rejected": _mean(policy_rejected_logps),
    }
    return losses, metrics


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------
def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean[log π(y'|x) - log π_ref(y'|x)]), detached.

    The log-probs are of *mismatched* pairs (x, y'): each prompt paired with another example's
    completion from the same batch (Ethayarajh et al. 2024), a biased but cheap
    estimate of KL(π || π_ref). Under data parallelism, average across processes before use.
    """
    _same_shape(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        raise ValueError("kto_kl_estimate needs at least one mismatched pair")
    return (policy_kl_logps - ref_kl_logps).detach().float().mean().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl: torch.Tensor | float, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired labelled examples.

    With r = log π(y|x) - log π_ref(y|x) and reference point z0 = max(0, KL) (detached):

        v(x, y) = λ_D σ(β (r - z0))   if y is desirable
                  λ_U σ(β (z0 - r))   if y is undesirable
        loss    = λ_y - v(x, y)

    ``labels``: (B,) bool, True = desirable. ``kl``: usually ``kto_kl_estimate(...)``; it is
    detached and clamped at 0 here too. The paper recommends λ_D n_D / (λ_U n_U) in [1, 4/3].
    A batch with one label only is valid (the z0 term still anchors the rewards).
    """
    _same_shape(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    _positive("beta", beta)
    _positive("desirable_weight", desirable_weight)
    _positive("undesirable_weight", undesirable_weight)
    labels = labels.bool()
    z0 = torch.as_tensor(kl, dtype=torch.float32, device=policy_logps.device).detach().clamp(min=0)
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(labels, desirable, undesirable)

    rewards = beta * r.detach()
    metrics: Metrics = {"kl": z0.detach().clone(), "count/desirable": labels.sum().float(),
                        "count/undesirable": (~labels).sum().float()}
    if labels.any():
        metrics["rewards/chosen"] = _mean(rewards[labels])
        metrics["logps/chosen"] = _mean(policy_logps[labels])
    if (~labels).any():
        metrics["rewards/rejected"] = _mean(rewards[~labels])
        metrics["logps/rejected"] = _mean(policy_logps[~labels])
    if labels.any() and (~labels).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses, metrics


# --------------------------------------------------------------------------------------------
# reference-free preference losses
# --------------------------------------------------------------------------------------------
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) far from it. x = 0 gives -inf; callers clamp first."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# Length-averaged log-probs are clamped to this from above before computing odds, so p = 1
# (log p = 0, odds = inf) gives a large finite log-odds instead of inf/NaN.
_MAX_AVG_LOGP = -1e-6


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    lp = (avg_logp if avg_logp.dtype == torch.float64 else avg_logp.float()).clamp(max=_MAX_AVG_LOGP)
    return lp - log1mexp(lp)  # log(p / (1 - p))


def _check_lengths(name: str, lengths: torch.Tensor) -> None:
    if (lengths <= 0).any():
        raise ValueError(f"{name} must be > 0 (empty completion?), got {lengths.tolist()}")


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
              lam: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Odds Ratio Preference Optimization (Hong et al. 2024); no reference model.

        P(y|x)  = exp(log π(y|x) / |y|)           (length-averaged likelihood)
        odds(y) = P / (1 - P),   log odds = log P - log(1 - P)
        loss    = L_NLL(y_w) + λ · -log σ(log odds(y_w) - log odds(y_l))

    L_NLL(y_w) = -log π(y_w|x) / |y_w| (per-token NLL of the chosen response). log(1 - P) is
    computed stably (``log1mexp``) and log P is clamped just below 0 so P = 1 stays finite.
    """
    _same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _positive("lam", lam)
    _check_lengths("chosen_lengths", chosen_lengths)
    _check_lengths("rejected_lengths", rejected_lengths)
    avg_c = policy_chosen_logps / chosen_lengths
    avg_r = policy_rejected_logps / rejected_lengths
    log_odds_ratio = _log_odds(avg_c) - _log_odds(avg_r)
    or_loss = -F.logsigmoid(log_odds_ratio)
    nll = -avg_c
    losses = nll + lam * or_loss
    # The ORPO paper's reported "rewards" are λ-scaled average log-probs.
    chosen_rewards, rejected_rewards = lam * avg_c.detach(), lam * avg_r.detach()
    metrics = {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": _mean(chosen_rewards > rejected_rewards),
        "log_odds_ratio": _mean(log_odds_ratio),
        "or_loss": _mean(or_loss),
        "nll_loss": _mean(nll),
    }
    return losses, metrics


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 2.0,
               gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """Simple Preference Optimization (Meng et al. 2024); no reference model.

        r(x, y) = β / |y| · log π(y|x)                (length-normalized reward)
        loss    = -log σ(r(x, y_w) - r(x, y_l) - γ)

    The target margin is given as γ/β (the paper tunes that ratio; γ = β · gamma_beta_ratio),
    defaults β = 2.0, γ/β = 0.5. ``label_smoothing`` ε mixes in -ε log σ(-(...)) as in cDPO.
    """
    _same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _positive("beta", beta)
    if gamma_beta_ratio < 0:
        raise ValueError(f"gamma_beta_ratio must be >= 0, got {gamma_beta_ratio}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_lengths("chosen_lengths", chosen_lengths)
    _check_lengths("rejected_lengths", rejected_lengths)
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths
    z = chosen_rewards - rejected_rewards - beta * gamma_beta_ratio
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    metrics = {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": _mean(chosen_rewards > rejected_rewards),
    }
    return losses, metrics


# --------------------------------------------------------------------------------------------
# PPO / GRPO (token level)
# --------------------------------------------------------------------------------------------
def _normalize_tokens(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor | None):
    # sum / (number of tokens): num_tokens lets a caller normalize by the token count of the whole
    # optimizer batch across gradient-accumulation micro-batches (DAPO's token-level mean).
    m = mask.to(per_token.dtype)
    if num_tokens is None:
        return (per_token * m).sum() / m.sum().clamp(min=1)
    return (per_token * m).sum() / max(float(num_tokens), 1.0)


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                    num_tokens: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token, masked token mean.

        ρ_t  = exp(log π(a_t|s_t) - log π_old(a_t|s_t))
        loss = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1 - ε_low, 1 + ε_high))

    All of (B, T). ``clip_eps_high`` defaults to ``clip_eps`` (DAPO's "clip-higher" when larger).
    Metrics: clipfrac (share of tokens where the clipped branch is active), approx_kl (k3
    estimate of KL(π_old || π)), ratio (mean ρ).
    """
    _same_shape(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    _positive("clip_eps", clip_eps)
    _positive("clip_eps_high", hi)
    advantages = advantages.detach()
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + hi)
    per_token = torch.maximum(unclipped, clipped)
    loss = _normalize_tokens(per_token, mask, num_tokens)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).float(),
            "ratio": masked_mean(ratio, mask).float(),
        }
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2, num_tokens: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss (the PPO2 baselines / Ziegler et al. 2019 form):

        V_clip = V_old + clip(V - V_old, -c, c)
        loss   = 0.5 · mean_t max((V - R)², (V_clip - R)²)
    """
    _same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    _positive("clip_range", clip_range)
    old_values, returns = old_values.detach(), returns.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * _normalize_tokens(torch.maximum(err, err_clipped), mask, num_tokens)
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean((err_clipped > err).float(), mask),
            "values": masked_mean(values, mask).float(),
            "vf_mse": masked_mean(err, mask).float(),
        }
    return loss, metrics


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, ref_logps: torch.Tensor | None = None, beta: float = 0.0,
              clip_eps: float = 0.2, clip_eps_high: float | None = None, normalization: str = "token",
              num_tokens: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Group Relative Policy Optimization objective (Shao et al. 2024, DeepSeekMath eq. 3).

        ρ_t    = exp(log π - log π_old)                      (old_logps=None: π_old = sg(π))
        L_t    = -min(ρ_t A, clip(ρ_t, 1 - ε_low, 1 + ε_high) A) + β · k3_t
        k3_t   = exp(log π_ref - log π) - (log π_ref - log π) - 1     (Schulman's k3 KL estimator)

    ``advantages``: (B,) per completion (``grpo_advantages``) or (B, T). ``normalization``:
    "token" = sum over all completion tokens / total tokens (DAPO, Yu et al. 2025; ``num_tokens``
    overrides the denominator for gradient accumulation), or "sequence" = mean over each
    completion's tokens, then mean over completions (the original GRPO).
    """
    if normalization not in ("token", "sequence"):
        raise ValueError(f"normalization must be 'token' or 'sequence', got {normalization!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError("grpo_loss with beta > 0 needs ref_logps")
    if old_logps is None:
        old_logps = logps.detach()
    advantages = advantages.detach()
    if advantages.dim() == 1:
        if advantages.shape[0] != logps.shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} entries but logps has batch size "
                             f"{logps.shape[0]}")
        advantages = advantages[:, None].expand_as(logps)
    _same_shape(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask, ref_logps=ref_logps)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    _positive("clip_eps", clip_eps)
    _positive("clip_eps_high", hi)

    ratio = torch.exp(logps - old_logps.detach())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + hi) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    kl = None
    if ref_logps is not None:
        d = ref_logps.detach() - logps
        kl = torch.exp(d) - d - 1
        if beta > 0:
            per_token = per_token + beta * kl
    if normalization == "token":
        loss = _normalize_tokens(per_token, mask, num_tokens)
    else:
        loss = masked_mean(per_token, mask, dim=-1).mean()
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped < unclipped).float(), mask),
                   "ratio": masked_mean(ratio, mask).float()}
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask).float()
    return loss, metrics


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages: A_i = (r_i - mean(group)) / (std(group) + eps).

    ``rewards``: (B * G,) with each prompt's G completions contiguous. ``scale=False`` drops the
    std division (Dr. GRPO, Liu et al. 2025). A group whose rewards are all equal gets A = 0.
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2 completions per prompt (got {group_size}): a group "
                         "of one has no baseline")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    r = rewards.float().view(-1, group_size)  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16), per token.

        δ_t = r_t + γ V_{t+1} - V_t,     A_t = δ_t + γ λ A_{t+1},     R_t = A_t + V_t

    rewards, values, mask: (B, T). Only positions where ``mask`` is true are steps of the episode;
    the "next" step of a position is the next masked-in position in its row (so left or right
    padding and gaps are skipped), and after the last one V = 0 (terminal). Returns (advantages,
    returns), both 0 at masked-out positions.
    """
    _same_shape(rewards=rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask.bool()
    values = values.detach()
    B, T = rewards.shape
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    next_value = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    next_adv = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    for t in reversed(range(T)):
        mt = m[:, t]
        delta = rewards[:, t].float() + gamma * next_value - values[:, t].float()
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(mt, a, 0.0)
        next_value = torch.where(mt, values[:, t].float(), next_value)
        next_adv = torch.where(mt, a, next_adv)
    returns = torch.where(m, adv + values.float(), 0.0)
    return adv, returns
