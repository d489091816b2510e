"""Batched next-token sampling with per-row parameters.

Order of operations on each row's logits (float32):
  0. logit_bias (OpenAI: the value is added to that token's logit; -100 all but bans it);
  1. penalties: repetition (CTRL, Keskar et al. 2019: seen token's logit / p if > 0 else * p, over
     prompt + output tokens), then frequency and presence (OpenAI: logit -= f * count + p * [count > 0],
     over output tokens only);
  2. banned tokens (EOS / stop tokens while fewer than `min_tokens` were generated) -> -inf, then
     structured output: a constrained row's tokens its grammar does not allow -> -inf
     (engine/structured/mask.py; unconstrained rows untouched);
  3. greedy rows (temperature 0) take the argmax here;
  4. temperature, then min-p (drop p < min_p * p_max), top-k (keep the k largest; ties at the
     k-th value kept), top-p (keep the smallest prefix of the sorted distribution whose mass
     reaches top_p: a token is dropped when the mass strictly before it is already >= top_p);
  5. one uniform draw per row from the row's own torch.Generator, mapped through the row's CDF
     (inverse-transform sampling; the CDF in two levels, over blocks of tokens and then inside one).
     Each row consumes exactly one number from its own generator and every operation above is
     row-wise, so a seeded request samples the same tokens whatever else is in the batch.
Totality: whatever the parameters, every row yields a token id in [0, V). Temperatures below 1e-5
are greedy; NaN logits (0 / 0 from a repetition penalty that rounds to 0 in float32) count as
excluded and +inf as the largest float; top-p always keeps the most likely token (a top_p that rounds
to 0 in float32 would drop them all); a row whose every token is excluded (stop_token_ids listing the
whole vocabulary under min_tokens) falls back to its unpenalized, unmasked logits.
Log-probabilities (`logprobs=N`) are those of the raw model distribution (before penalties and
temperature), as in vLLM: the sampled token plus the top N, each with its rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.sequence import Logprob


@dataclass
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_ids: list[int] | None = None  # for the repetition penalty
    output_ids: list[int] | None = None  # for all penalties
    banned_ids: list[int] | None = None  # -inf before sampling (min_tokens)
    grammar: Any = None  # structured.grammar.GrammarMatcher: only the tokens it allows can be sampled


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]


def _count_matrix(ids: list[list[int]], V: int, device: torch.device) -> torch.Tensor:
    """(N, V) float counts of each token id per row."""
    N = len(ids)
    L = max((len(x) for x in ids), default=0)
    counts = torch.zeros(N, V + 1, device=device)
    if L == 0:
        return counts[:, :V]
    idx = torch.full((N, L), V, dtype=torch.long)  # pad with a dummy column V
    for i, x in enumerate(ids):
        if x:
            idx[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    counts.scatter_add_(1, idx.to(device), torch.ones(N, L, device=device))
    return counts[:, :V]


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]],
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits (N, V); penalties (N,) each. Returns new logits."""
    N, V = logits.shape
    out_counts = _count_matrix(output_ids, V, logits.device)
    seen = (_count_matrix(prompt_ids, V, logits.device) > 0) | (out_counts > 0)
    rep = repetition[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency[:, None] * out_counts - presence[:, None] * (out_counts > 0).float()


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled logits (N, V) -> logits with excluded tokens at -inf.

    top_k (N,) long, 0 = off; top_p (N,) float, 1 = off; min_p (N,) float, 0 = off."""
    N, V = logits.shape
    neg_inf = float("-inf")
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        thresh = probs.amax(-1, keepdim=True) * min_p[:, None]
        logits = logits.masked_fill(probs < thresh, neg_inf)
    use_k = top_k > 0
    use_p = top_p < 1.0
    if bool(use_p.any()):
        sorted_logits, idx = logits.sort(-1, descending=True)
        if bool(use_k.any()):
            ranks = torch.arange(V, device=logits.device)[None, :]
            k = torch.where(use_k, top_k, torch.full_like(top_k, V)).clamp_max(V)
            kth = sorted_logits.gather(1, (k - 1)[:, None])
            sorted_logits = sorted_logits.masked_fill((sorted_logits < kth) & (ranks >= k[:, None]), neg_inf)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
        drop[:, 0] = False  # the most likely token always stays (top_p=1e-300 is 0.0 in float32)
        sorted_logits = sorted_logits.masked_fill(drop, neg_inf)
        logits = torch.empty_like(logits).scatter_(1, idx, sorted_logits)
    elif bool(use_k.any()):
        kmax = int(top_k.max().clamp_max(V))
        top_vals = logits.topk(kmax, dim=-1).values  # (N, kmax), descending
        k = torch.where(use_k, top_k, torch.full_like(top_k, kmax)).clamp_max(kmax)
        kth = top_vals.gather(1, (k - 1)[:, None])
        kth = torch.where(use_k[:, None], kth, torch.full_like(kth, neg_inf))
        logits = logits.masked_fill(logits < kth, neg_inf)
    return logits


_CDF_BLOCK = 1024  # vocabulary positions per block of the two-level CDF (see _sample_from_logits)
_EXP_FLOOR = float(torch.tensor(-80.0).exp())  # float32 exp of the logit floor (see _sample_from_logits)


def _sample_from_logits(scaled: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Inverse-transform sampling from softmax(scaled) (N, V) (excluded tokens at -inf): one uniform
    u in (0, 1] per row from that row's generator; the token is the first whose cumulative mass reaches
    u times the total. Overwrites `scaled`.

    Why two levels: a float64 cumsum over the whole (N, V) row was most of the sampler's time (64 x
    49152: 5.9 ms per step of which the full softmax and cumsum 4 ms). Here only unnormalized
    probabilities e = exp(x - max) are computed (one pass), summed per block of _CDF_BLOCK tokens; the
    cumsum runs over the block sums, then inside the one chosen block. Every step is row-wise, so a
    row's token does not depend on the other rows."""
    N, V = scaled.shape
    u = torch.empty(N, dtype=torch.float64)
    for i, g in enumerate(generators):
        u[i] = 1.0 - torch.rand((), generator=g, dtype=torch.float64)  # (0, 1]: never picks a p=0 token
    B = _CDF_BLOCK
    nb = -(-V // B)
    # x86 computes exp(x) ~10-100x slower when x is -inf or the result underflows (x < -87; a random
    # model's 32 x 49152 logits took 7 ms instead of 0.3 ms). So exp runs on max(x, -80), and every
    # token at that floor gets p = 0: those below e^-80 of the top token's probability (total mass
    # < V * 2e-35) and those excluded (-inf).
    scaled.sub_(scaled.amax(-1, keepdim=True)).clamp_min_(-80.0)
    if V == nb * B:
        e = scaled.exp_()
    else:
        e = scaled.new_empty(N, nb * B)
        e[:, V:] = 0.0  # padding columns: p = 0
        torch.exp(scaled, out=e[:, :V])
    F.threshold_(e, _EXP_FLOOR, 0.0)  # e <= exp(-80) -> 0
    # fp32 sums of 1024 terms in [0, 1] (relative error ~1e-7; a float64 reduction was 6x slower)
    blocks = e.view(N, nb, B).sum(-1).double()  # (N, nb) mass per block
    cb = blocks.cumsum(-1)
    target = (u.to(e.device) * cb[:, -1])[:, None]  # (N, 1), in (0, total]
    bi = torch.searchsorted(cb, target).clamp_max(nb - 1)  # first block reaching the target: mass > 0
    before = (cb.gather(1, bi) - blocks.gather(1, bi))  # mass of the blocks before it
    inner = e.view(N, nb, B)[torch.arange(N, device=e.device), bi[:, 0]].double().cumsum(-1)  # (N, B)
    # rounding could put the remainder outside (0, block mass]: clamp so a p > 0 token is picked
    rest = (target - before).clamp(min=torch.finfo(torch.float64).tiny).minimum(inner[:, -1:])
    j = torch.searchsorted(inner, rest)
    return (bi * B + j).squeeze(1)


_FMAX = torch.finfo(torch.float32).max


def _total(logits: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Processed float logits (N, V) -> the same with NaN excluded (-inf), +inf the largest float, and
    every row that excludes all tokens replaced by its raw logits (so each row can yield a token)."""
    logits = torch.nan_to_num_(logits, nan=float("-inf"), posinf=_FMAX, neginf=float("-inf"))
    dead = torch.isneginf(logits).all(-1)
    if bool(dead.any()):
        logits[dead] = torch.nan_to_num(raw[dead].float(), nan=0.0, posinf=_FMAX, neginf=-_FMAX)
    return logits


def compute_logprobs(raw_logits: torch.Tensor, tokens: torch.Tensor, nums: list[int]) -> list[dict[int, Logprob]]:
    """For each row: {sampled token: Logprob, then the top-`nums[i]` tokens} (ranks are 1-based)."""
    lp = raw_logits.float().log_softmax(-1)  # (N, V)
    chosen = lp.gather(1, tokens[:, None])  # (N, 1)
    ranks = (lp > chosen).sum(-1) + 1
    kmax = max(nums)
    top_v, top_i = lp.topk(kmax, dim=-1) if kmax > 0 else (None, None)
    out = []
    for i, n in enumerate(nums):
        d = {int(tokens[i]): Logprob(float(chosen[i, 0]), int(ranks[i]))}
        for r in range(n):
            t = int(top_i[i, r])
            if t not in d:
                d[t] = Logprob(float(top_v[i, r]), r + 1)
        out.append(d)
    return out


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
        """logits (N, V) for N rows -> one token per row (plus logprobs where asked)."""
        N, V = logits.shape
        assert N == len(rows), (N, len(rows))
        raw = logits
        dev = logits.device
        params = [r.params for r in rows]

        pen_rows = [i for i, p in enumerate(params) if p.needs_penalties]
        banned = [(i, t) for i, r in enumerate(rows) for t in (r.banned_ids or []) if 0 <= t < V]
        biased = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items() if t < V]
        # all-greedy rows without penalties or bans take the argmax of the raw (e.g. bf16) logits: the
        # same index as after an exact upcast, without an (N, V) fp32 copy (64 x 151936: 3.5 ms, not 4.1)
        g_rows = [i for i, r in enumerate(rows) if r.grammar is not None]
        if pen_rows or banned or g_rows or biased or not all(p.greedy for p in params):
            logits = logits.float()
        if biased:
            logits = logits.clone()
            bi = torch.tensor([(i, t) for i, t, _ in biased], device=dev)
            logits[bi[:, 0], bi[:, 1]] += torch.tensor([b for _, _, b in biased], device=dev)
        if pen_rows:
            sel = torch.tensor(pen_rows, device=dev)
            logits = logits.clone()
            logits[sel] = apply_penalties(
                logits[sel],
                [rows[i].prompt_ids or [] for i in pen_rows],
                [rows[i].output_ids or [] for i in pen_rows],
                torch.tensor([params[i].repetition_penalty for i in pen_rows], device=dev),
                torch.tensor([params[i].presence_penalty for i in pen_rows], device=dev),
                torch.tensor([params[i].frequency_penalty for i in pen_rows], device=dev),
            )
        if banned:
            if not pen_rows and not biased:
                logits = logits.clone()
            bi = torch.tensor(banned, device=dev)
            logits[bi[:, 0], bi[:, 1]] = float("-inf")
        if g_rows:
            from lmstack.engine.structured.mask import apply_grammar_masks

            if not pen_rows and not banned and not biased and logits.data_ptr() == raw.data_ptr():
                logits = logits.clone()  # fp32 input: .float() did not copy, and raw feeds the logprobs
            apply_grammar_masks(logits, g_rows, [rows[i].grammar for i in g_rows])

        if pen_rows or banned or g_rows:  # the only steps that make NaN or all-excluded rows
            logits = _total(logits, raw)

        tokens = torch.empty(N, dtype=torch.long, device=dev)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        # max().indices: the first maximal index, exactly argmax's tie rule, but 3x faster on CPU at
        # (64, 151936) (3.6 vs 11 ms per step)
        if len(greedy) == N:  # the common case: no (N, V) row-gather copy
            tokens = logits.max(-1).indices
        elif greedy:
            g = torch.tensor(greedy, device=dev)
            tokens[g] = logits[g].max(-1).indices
        if rand:
            r = torch.tensor(rand, device=dev)
            temp = torch.tensor([params[i].temperature for i in rand], device=dev)
            scaled = (logits if len(rand) == N else logits[r]) / temp[:, None]  # a new tensor either way
            scaled.clamp_(max=_FMAX)  # a 1e6 logit / 1e-5 overflows to inf; inf - inf would be NaN
            scaled = filter_logits(
                scaled,
                torch.tensor([params[i].top_k for i in rand], device=dev, dtype=torch.long),
                torch.tensor([params[i].top_p for i in rand], device=dev),
                torch.tensor([params[i].min_p for i in rand], device=dev),
            )
            tokens[r] = _sample_from_logits(scaled, [rows[i].generator for i in rand])

        logprobs: list[dict[int, Logprob] | None] = [None] * N
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if lp_rows:
            sel = torch.tensor(lp_rows, device=dev)
            for i, d in zip(lp_rows, compute_logprobs(raw[sel], tokens[sel], [params[i].logprobs for i in lp_rows])):
                logprobs[i] = d
        return SampleResult(tokens.tolist(), logprobs)
