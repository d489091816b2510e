"""Fused linear + cross-entropy for training: the summed next-token NLL straight from hidden states.

Full-vocabulary logits are the largest activation of a small LM (T x V floats per sequence, more
with their fp32 copies and gradients). Here they exist only `chunk` rows at a time, and only for
rows that have a target (SFT masks the prompt, so often half the rows are skipped outright).
Because the loss is a scalar sum, its gradients w.r.t. the hidden states and the output weight are
computed in the same pass (Liger-kernel style: d loss / d logits = softmax - onehot); backward
only scales them by the incoming gradient. So the lm_head costs three matmuls, as unfused, with
O(chunk x V) extra memory. `lmstack.train.losses.chunked_nll` is the recompute-in-backward
variant (four matmuls, nothing kept); this one trades a (N, D) + (V, D) gradient buffer for speed.
"""
from __future__ import annotations

import torch


class _FusedLinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        w = weight.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_w = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_w, device=weight.device) if need_w else None
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax in fp32 (fp64 if computing in fp64)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk].to(compute_dtype)
            y = targets[s:s + chunk]
            # log-softmax straight from the compute-dtype logits into fp32: one fused pass instead of
            # a cast, a logsumexp and a subtraction over the (C, V) matrix
            lsm = torch.log_softmax(h @ w.t(), dim=-1, dtype=acc)  # (C, V)
            total -= lsm.gather(1, y[:, None]).sum()
            if need_h or need_w:
                g = lsm.exp_()  # softmax, in place
                g.scatter_add_(1, y[:, None], torch.full((g.shape[0], 1), -1.0, dtype=acc, device=g.device))  # softmax - onehot
                g = g.to(compute_dtype)
                if need_h:
                    grad_h[s:s + chunk] = (g @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (g.t() @ h).to(acc_w)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out.to(grad_w.dtype)).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


class _QuantHeadLogProb(torch.autograd.Function):
    """Per-token log-probs logp_i = z_i[y_i] - logsumexp(z_i), z_i = h_i W^T / T, for a frozen
    quantized head (QLoRA with NF4 embeddings) whose 16-bit weight must never exist whole: the head
    is decoded `vchunk` vocabulary rows at a time.

    Forward keeps an online logsumexp over the vocabulary chunks (Milakov & Gimelshein 2018):
    m' = max(m, max_j z_j), s' = s e^(m - m') + sum_j e^(z_j - m'), lse = m + log s.
    Backward decodes the chunks again: d logp_i / d z_i = onehot(y_i) - softmax(z_i), so
    grad_h = sum_chunks (g_i / T) (onehot - softmax) W_chunk. Three matmuls and two decodes of the
    head per step; O(N x vchunk) extra memory. The head is frozen: it gets no gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head, targets: torch.Tensor, vchunk: int, temperature: float,
                compute_dtype: torch.dtype) -> torch.Tensor:
        n, V = hidden.shape[0], head.out_features
        h = hidden.to(compute_dtype)
        absmax = head.absmax()  # decoded once for every chunk
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax statistics in fp32 (fp64 in fp64)
        m = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
        s = torch.zeros(n, dtype=acc, device=hidden.device)
        tgt = torch.zeros(n, dtype=acc, device=hidden.device)
        for v0 in range(0, V, vchunk):
            v1 = min(V, v0 + vchunk)
            _, z = _chunk_logits(h, head, v0, v1, absmax, acc, temperature)  # (N, Vc)
            m_new = torch.maximum(m, z.amax(dim=1))
            s = s * (m - m_new).exp() + (z - m_new[:, None]).exp().sum(dim=1)
            m = m_new
            hit = ((targets >= v0) & (targets < v1)).nonzero().squeeze(1)
            tgt[hit] = z[hit, targets[hit] - v0]
        lse = m + s.log()  # (N,)
        ctx.save_for_backward(hidden, targets, lse)
        ctx.head, ctx.vchunk, ctx.temperature, ctx.cdt = head, vchunk, temperature, compute_dtype
        return tgt - lse

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, targets, lse = ctx.saved_tensors
        head, vchunk, temperature, cdt = ctx.head, ctx.vchunk, ctx.temperature, ctx.cdt
        h = hidden.to(cdt)
        absmax, acc = head.absmax(), lse.dtype
        coef = (-grad_out.to(acc) / temperature)[:, None]  # turns (softmax - onehot) into g (onehot - softmax) / T
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        for v0 in range(0, head.out_features, vchunk):
            v1 = min(head.out_features, v0 + vchunk)
            w, z = _chunk_logits(h, head, v0, v1, absmax, acc, temperature)
            p = z.sub_(lse[:, None]).exp_()  # softmax over this chunk's columns
            hit = ((targets >= v0) & (targets < v1)).nonzero().squeeze(1)
            p[hit, targets[hit] - v0] -= 1.0  # softmax - onehot
            grad_h += (p.mul_(coef).to(cdt) @ w).to(acc)
        return grad_h.to(hidden.dtype), None, None, None, None, None


def _chunk_logits(h: torch.Tensor, head, v0: int, v1: int, absmax: torch.Tensor, acc: torch.dtype,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocabulary rows [v0, v1) of the head decoded in h's dtype (Vc, D), and h W_chunk^T / T in acc (N, Vc)."""
    w = head.dequantize_rows(v0, v1, h.dtype, absmax)
    z = (h @ w.t()).to(acc)
    return w, (z.div_(temperature) if temperature != 1.0 else z)


def quant_head_logps(hidden: torch.Tensor, head, targets: torch.Tensor, temperature: float = 1.0,
                     budget: int = 1 << 21) -> torch.Tensor:
    """log softmax(hidden @ head.dequantize().T / temperature)[targets] for a frozen quantized head
    with `dequantize_rows` (NF4Linear): hidden (N, D), targets (N,) in [0, V) -> (N,) fp32 (fp64 for
    an fp64 head). Vocabulary chunks hold about `budget` logits (8 MiB in fp32) at a time."""
    D = hidden.shape[-1]
    dev = hidden.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else head.compute_dtype
    # chunks of ~budget logits, and of at most ~1M decoded weights (the decode's temporaries are ~8 bytes
    # per weight: a 16k-row chunk of a 576-wide head would add 75 MB to the step's peak)
    vchunk = max(64, min(budget // max(1, hidden.shape[0]), (1 << 20) // D))
    return _QuantHeadLogProb.apply(hidden, head, targets, vchunk, float(temperature), cdt)


def fused_quant_head_nll(hidden: torch.Tensor, head, labels: torch.Tensor, ignore_index: int = -100,
                         budget: int = 1 << 21) -> torch.Tensor:
    """fused_linear_nll for a frozen quantized head with `dequantize_rows` (NF4Linear): equals
    F.cross_entropy(hidden @ head.dequantize().T, labels, reduction="sum") in value and in gradient
    w.r.t. hidden."""
    D = hidden.shape[-1]
    h, y = hidden.reshape(-1, D), labels.reshape(-1)  # (N, D), (N,)
    keep = (y != ignore_index).nonzero().squeeze(1)
    if keep.numel() == 0:
        return (hidden.sum() * 0.0).float()
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    if int(y.min()) < 0 or int(y.max()) >= head.out_features:
        raise ValueError(f"labels must lie in [0, {head.out_features}) or equal ignore_index={ignore_index}")
    return -quant_head_logps(h, head, y, budget=budget).sum()


def fused_linear_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                     chunk: int = 1024) -> torch.Tensor:
    """sum over positions with labels != ignore_index of -log softmax(hidden @ weight.T)[label].

    hidden (..., D), weight (V, D), labels (...) int64. Equals
    F.cross_entropy(hidden @ weight.T, labels, ignore_index=..., reduction="sum") in value and
    gradient. Under autocast the matmuls run in the autocast dtype, the softmax in fp32.
    """
    D = hidden.shape[-1]
    h = hidden.reshape(-1, D)  # (N, D)
    y = labels.reshape(-1)
    keep = (y != ignore_index).nonzero().squeeze(1)
    if keep.numel() == 0:
        return (hidden.sum() * 0.0).float()  # no targets: a zero that still connects to the graph
    h, y = h.index_select(0, keep), y.index_select(0, keep)  # only rows with a target
    if int(y.min()) < 0 or int(y.max()) >= weight.shape[0]:
        raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")
    dev = hidden.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(h.dtype, weight.dtype)
    return _FusedLinearNLL.apply(h, weight, y, chunk, cdt)
