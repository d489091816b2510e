"""Device-side sampling: one token per row by the Gumbel-max trick with counter-based noise.

argmax_v (x_v / T + g_v), g_v ~ Gumbel(0, 1) i.i.d., is an exact sample from softmax(x / T)
(Gumbel 1954; the "Gumbel-max trick"). With g_v = Gumbel(Philox(seed, step, v)) (philox.py), the
token of a row is a pure function of (its logits, temperature, filters, seed, step): the same
whatever else is in the batch, on any device, in any launch order. This is how the GPU engine can
keep the CPU sampler's guarantee (engine/sampler.py draws one uniform per row from the row's own
torch.Generator instead, which needs a host loop over the rows). Inverse-CDF sampling with one
Philox uniform per row would need a normalizing pass and a scan; Gumbel-max is one pass over the
logits with a running (max, argmax) per row, and no (N, V) probabilities are ever written.

Filters (the engine's semantics, engine/sampler.py filter_logits: min-p, then top-k, then top-p on
what is left) all keep a prefix of the tokens sorted by logit, so each row's kept set is "logit >=
a threshold". `filter_threshold` computes that threshold per row in PyTorch (a row-wise sort when
top-p is on, top-k otherwise: no cross-row operation, so batch-independent); the kernel then keeps
x / T >= thr. Ties at the cut-off value are all kept (the CPU sampler may split a tie at the top-p
cut by sort order; with real-valued logits such ties have probability ~0).

Shapes: logits (N, V) any float dtype (read once, fp32 in registers); temperature (N,) (0 = greedy:
the first maximal raw logit, as torch.argmax); top_k (N,) int (0 = off); top_p (N,) (1 = off);
min_p (N,) (0 = off); seeds, steps (N,) int64 (step = tokens generated so far). Returns (N,) int64.
"""
import torch

from lmstack.kernels.cuda._triton import tl, triton, usable
from lmstack.kernels.cuda.philox import gumbel, gumbel_noise_ref


@triton.jit
def _sample_kernel(logits_ptr, stride_l, inv_t_ptr, thr_ptr, seeds_ptr, steps_ptr, out_ptr, V,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    inv_t = tl.load(inv_t_ptr + row)
    thr = tl.load(thr_ptr + row)
    seed = tl.load(seeds_ptr + row)
    step = tl.load(steps_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_l
    best = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), 0)  # a scalar running max
    arg = row * 0  # and its index (an int32 scalar 0)
    for v0 in range(0, V, BLOCK_V):
        tok = v0 + tl.arange(0, BLOCK_V)
        mask = tok < V
        x = tl.load(base + tok, mask=mask, other=0.0).to(tl.float32)  # masked: dropped below
        y = x * inv_t  # multiply by 1/T, not divide: exactly rounded in PyTorch and Triton alike
        noisy = tl.where(y >= thr, y + gumbel(seed, step, tok), float("-inf"))
        val = tl.where(mask, tl.where(inv_t == 0.0, x, noisy), float("-inf"))
        cmax = tl.max(val, 0)
        carg = tl.argmax(val, 0) + v0  # first maximal index of the chunk
        upd = cmax > best  # strict: an equal later chunk does not win (first index overall)
        arg = tl.where(upd, carg, arg)
        best = tl.where(upd, cmax, best)
    tl.store(out_ptr + row, arg.to(tl.int64))


def filter_threshold(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled fp32 logits (N, V) -> (N,) fp32: keep token v of row i iff scaled[i, v] >=
    thr[i] (-inf: keep all). Same kept sets as engine/sampler.py filter_logits (ties aside)."""
    N, V = scaled.shape
    neg_inf = torch.full((N,), float("-inf"), device=scaled.device)
    thr = neg_inf
    mx = scaled.amax(-1)
    use_min = min_p > 0
    if bool(use_min.any()):  # p_v >= min_p p_max  <=>  x_v >= x_max + log(min_p)
        thr = torch.where(use_min, mx + torch.log(min_p.float().clamp_min(1e-30)), thr)
    use_k = top_k > 0
    use_p = top_p < 1.0
    if bool(use_p.any()):
        sv = scaled.sort(-1, descending=True).values  # (N, V)
        if bool(use_k.any()):
            kth = sv.gather(1, (top_k.long().clamp(1, V) - 1)[:, None])[:, 0]
            thr = torch.where(use_k, torch.maximum(thr, kth), thr)
        kept = sv >= thr[:, None]
        p = sv.masked_fill(~kept, float("-inf")).softmax(-1)  # renormalized over what min-p / top-k kept
        kept = kept & ((p.cumsum(-1) - p) < top_p.float()[:, None])  # mass strictly before < top_p
        last = (kept.sum(-1) - 1).clamp_min(0)  # the first token is always kept
        thr = torch.where(use_p, sv.gather(1, last[:, None])[:, 0], thr)
    elif bool(use_k.any()):
        kmax = int(top_k.max().clamp(1, V))
        vals = scaled.topk(kmax, dim=-1).values  # (N, kmax) descending
        kth = vals.gather(1, (top_k.long().clamp(1, kmax) - 1)[:, None])[:, 0]
        thr = torch.where(use_k, torch.maximum(thr, kth), thr)
    return thr


def _inputs(logits, temperature, top_k, top_p, min_p):
    N = logits.shape[0]
    dev = logits.device
    t = temperature.float().to(dev)
    inv_t = torch.where(t > 0, 1.0 / t.clamp_min(1e-30), torch.zeros_like(t))  # (N,) 0 marks a greedy row
    top_k = torch.zeros(N, dtype=torch.long, device=dev) if top_k is None else top_k.to(dev)
    top_p = torch.ones(N, device=dev) if top_p is None else top_p.float().to(dev)
    min_p = torch.zeros(N, device=dev) if min_p is None else min_p.float().to(dev)
    if bool((top_k > 0).any() | (top_p < 1).any() | (min_p > 0).any()):
        thr = filter_threshold(logits.float() * inv_t[:, None], top_k, top_p, min_p)
    else:  # no filter: the kernel never needs the scaled (N, V) copy
        thr = torch.full((N,), float("-inf"), device=dev)
    return inv_t, thr


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
               top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
               min_p: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch reference (and fallback): the same tokens as the kernel, through (N, V) tensors."""
    inv_t, thr = _inputs(logits, temperature, top_k, top_p, min_p)
    x = logits.float()
    y = x * inv_t[:, None]
    g = gumbel_noise_ref(seeds.to(x.device), steps.to(x.device), x.shape[1])
    noisy = torch.where(y >= thr[:, None], y + g, torch.full_like(y, float("-inf")))
    return torch.where((inv_t == 0)[:, None], x, noisy).argmax(-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
           top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
           min_p: torch.Tensor | None = None, block_v: int = 2048) -> torch.Tensor:
    """(N, V) logits -> (N,) int64 tokens; see the module docstring. block_v: vocabulary entries per
    loop step of the one program per row (2048 fp32 in registers over 4 warps: 16 per thread)."""
    if logits.dim() != 2 or temperature.shape[0] != logits.shape[0] or seeds.shape != steps.shape \
            or seeds.shape[0] != logits.shape[0]:
        raise ValueError(f"sample: logits {tuple(logits.shape)}, temperature {tuple(temperature.shape)}, seeds "
                         f"{tuple(seeds.shape)} and steps {tuple(steps.shape)} do not describe the same rows")
    if not usable(logits, seeds, steps) or logits.stride(-1) != 1:
        return sample_ref(logits, temperature, seeds, steps, top_k, top_p, min_p)
    inv_t, thr = _inputs(logits, temperature, top_k, top_p, min_p)
    N, V = logits.shape
    out = torch.empty(N, dtype=torch.int64, device=logits.device)
    if N:
        _sample_kernel[(N,)](logits, logits.stride(0), inv_t, thr.float(), seeds.long().contiguous(),
                             steps.long().contiguous(), out, V, BLOCK_V=block_v, num_warps=4)
    return out
