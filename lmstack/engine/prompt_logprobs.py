"""Prompt log-probabilities (vLLM's `prompt_logprobs`, OpenAI's `echo` + `logprobs`).

Entry j of a request's prompt log-probs scores prompt token j from the hidden state at position
j - 1, the same LM head and log-softmax as generated-token log-probs (the raw model distribution,
before penalties and temperature). A prefill chunk of T tokens has T hidden rows; the (T, V)
logits of a long prompt never exist at once: they are computed `CHUNK` rows at a time.

Prefix caching: a cached block was never run through the LM head, so a request asking for prompt
log-probs skips the cache lookup (`BlockManager.match_prefix`) and computes its whole prompt; its
blocks still enter the cache for later requests.
"""
from __future__ import annotations

from typing import Callable

import torch

from lmstack.engine.sampler import compute_logprobs
from lmstack.engine.sequence import Logprob, Sequence

CHUNK = 128  # rows of logits alive at once: 128 x 152k vocab x 4 B = 78 MB


@torch.no_grad()
def score_rows(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
               targets: list[int], num: int) -> list[dict[int, Logprob]]:
    """hidden (T, D) and the token each row should predict -> {target: Logprob, top-`num`...} per row."""
    out: list[dict[int, Logprob]] = []
    for a in range(0, len(targets), CHUNK):
        logits = compute_logits(hidden[a:a + CHUNK])  # (<=CHUNK, V)
        tgt = torch.tensor(targets[a:a + CHUNK], dtype=torch.long, device=logits.device)
        out.extend(compute_logprobs(logits, tgt, [num] * len(tgt)))
    return out


def record(seq: Sequence, start: int, hidden: torch.Tensor,
           compute_logits: Callable[[torch.Tensor], torch.Tensor],
           decode: Callable[[int], str] | None) -> None:
    """Score the prompt tokens this chunk (starting at position `start`) predicts into the request."""
    req = seq.request
    # hidden at position p predicts token p + 1; only prompt tokens 1 .. P-1 are scored
    b = max(0, min(start + hidden.shape[0], seq.num_prompt_tokens - 1) - start)
    if b == 0 or req.prompt_logprobs is None:
        return
    targets = req.prompt_token_ids[start + 1:start + 1 + b]
    scored = score_rows(compute_logits, hidden[:b], targets, req.params.prompt_logprobs)
    for j, d in enumerate(scored):
        if decode is not None:
            for t, lp in d.items():
                lp.decoded_token = decode(t)
        req.prompt_logprobs[start + 1 + j] = d  # a recompute after preemption rewrites the same values
