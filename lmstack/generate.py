"""Reference generation with a plain contiguous KV cache.

Deliberately simple: one (B, Hkv, T_max, D) cache per layer, left-padded prompts, one token per
step for every row. It is the correctness reference the paged engine is tested against, and what
`lmstack generate` uses.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from lmstack.model.attention import attention
from lmstack.model.transformer import Transformer


class ContiguousKVCache:
    """`meta` for Transformer.forward: appends k/v at `self.length` and attends over the prefix."""

    def __init__(self, model: Transformer, batch: int, max_len: int, key_padding_mask: torch.Tensor,
                 impl: str = "sdpa") -> None:
        cfg = model.config
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_layers)]
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=model.device)
        self.mask[:, : key_padding_mask.shape[1]] = key_padding_mask
        self.length = 0  # tokens already cached
        self.new = 0  # tokens being added by the current forward
        self.impl = impl

    def attend(self, layer_idx: int, q, k, v, window: int | None) -> torch.Tensor:
        s, e = self.length, self.length + q.shape[1]
        self.k[layer_idx][:, :, s:e] = k.transpose(1, 2)  # (B, Hkv, T, D)
        self.v[layer_idx][:, :, s:e] = v.transpose(1, 2)
        o = attention(q.transpose(1, 2), self.k[layer_idx][:, :, :e], self.v[layer_idx][:, :, :e], impl=self.impl,
                      causal=True, window=window, q_offset=s, key_padding_mask=self.mask[:, :e])
        return o.transpose(1, 2)  # (B, T, H, D)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps at least one)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(model: Transformer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                    eos_token_ids: Iterable[int] = (), impl: str = "sdpa") -> Iterator[list[int | None]]:
    """Yields, per step, one new token per row (None for rows already finished)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    B = len(prompt_ids)
    lens = [len(p) for p in prompt_ids]
    T = max(lens)
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds the model's context "
            f"(max_position_embeddings {limit})"
        )
    dev = model.device
    tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
    pad = torch.zeros(B, T, dtype=torch.bool, device=dev)
    for i, p in enumerate(prompt_ids):  # left padding: every row's last prompt token is at T - 1
        tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        pad[i, T - len(p):] = True
    positions = (pad.long().cumsum(-1) - 1).clamp_min(0)
    cache = ContiguousKVCache(model, B, T + max_new_tokens, pad, impl=impl)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    eos = set(eos_token_ids)
    done = [False] * B
    hidden = model(tokens, positions, meta=cache)
    cache.length = T
    next_pos = positions[:, -1:] + 1
    for _ in range(max_new_tokens):
        logits = model.compute_logits(hidden[:, -1])
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        out: list[int | None] = []
        for i in range(B):
            if done[i]:
                out.append(None)
                continue
            t = int(nxt[i])
            out.append(t)
            if t in eos:
                done[i] = True
        yield out
        if all(done):
            return
        cache.mask[:, cache.length] = True
        hidden = model(nxt[:, None], next_pos, meta=cache)
        cache.length += 1
        next_pos = next_pos + 1


def generate(model: Transformer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_ids: Iterable[int] = (),
             impl: str = "sdpa", on_step: Callable[[list[int | None]], None] | None = None) -> list[list[int]]:
    """Plain batched generation; returns the new tokens of each row (EOS included when produced)."""
    outs: list[list[int]] = [[] for _ in prompt_ids]
    for step in generate_stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                eos_token_ids, impl):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
        if on_step is not None:
            on_step(step)
    return outs
