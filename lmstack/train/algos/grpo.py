"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath §4.1).

Each rollout samples G completions per prompt with the lmstack engine on the live policy weights,
scores them with a Python reward function, and gives every completion the advantage
A_i = (r_i - mean(group)) / std(group) (no value model). The policy then takes `ppo_epochs` x
`num_minibatches` optimizer steps on the rollout with the clipped objective over the old-policy
log-probs recorded at rollout time, plus an optional k3 KL penalty to a frozen reference.

    lmstack train grpo configs/grpo.yaml

Data: JSONL records with `prompt` (string or messages) and `answer` (what the reward function
compares against); `messages` / `conversations` records work too (a trailing assistant turn is
dropped). The batch is `training.batch_size x training.grad_accum` prompts per rollout, so
G times as many sequences.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmstack.config import ConfigError
from lmstack.train.algos import LossOutput, register
from lmstack.train.algos._rollout import (
    Completion, OnlineStage, Reference, RewardFailure, RLExample, action_hidden, action_logps, completion_stats,
    micro_batches, pack, rollout_logps, score_with_fn, select)
from lmstack.train.losses import grpo_advantages, grpo_loss, masked_mean


@dataclass
class GRPOOptions:
    """`algo:` keys of `lmstack train grpo`.

    Suggested settings for the quickstart's CoT model (~1M parameters, full weights, 2 CPU cores):
    G = 8, training.batch_size 8 prompts, max_tokens 128-160 (the CoT answers are 20-80 tokens),
    temperature 1.0, beta 0, 1 epoch x 1 minibatch (fully on-policy), 30+ steps, optim.lr around
    1e-4 with a short warmup (SFT used 1e-3; 3e-5 moves a model this small very little in 30 steps).
    These are starting points, not a measured result: see the quickstart report for the numbers.
    """

    num_generations: int = 8  # G: completions per prompt (>= 2: a group of one has no baseline)
    max_tokens: int = 128  # completion length cap (a truncated completion usually gets no reward)
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_len: int = 512  # longer prompts are skipped (counted warning)
    chat_template: bool = True  # render prompts with the tokenizer's chat template
    reward_fn: str = "lmstack.tasks.arith:reward"  # reward(completion: str, answer) -> float
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    accuracy_threshold: float = 1.0  # reported accuracy = share of completions with reward >= this
    beta: float = 0.0  # k3 KL penalty to the reference policy; > 0 keeps a frozen reference
    clip_eps: float = 0.2  # PPO clip range, lower side
    clip_eps_high: float | None = None  # upper side (DAPO clip-higher); None = clip_eps
    normalization: str = "token"  # token (DAPO: mean over all tokens of the step) | sequence (per-completion mean)
    scale_rewards: bool = True  # divide by the group std (False: Dr. GRPO)
    ppo_epochs: int = 1  # passes over each rollout
    num_minibatches: int = 1  # optimizer steps per pass (each of training.grad_accum micro-batches)
    logp_rows: int = 16  # sequences per forward when recording old / reference log-probs
    # extra lmstack.LLM arguments (block_size ...); {"dtype": "bfloat16"} runs the rollouts of an fp32
    # policy with bf16 linears and K/V (2-3x faster on CPUs with native bf16; log-probs stay fp32), the
    # default when training.precision is bf16 on such a CPU
    engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"algo.num_generations must be >= 2 for GRPO (got {self.num_generations}): the "
                              "advantage of a completion is its reward minus its group's mean")
        if self.max_tokens < 1:
            raise ConfigError(f"algo.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"algo.temperature must be > 0 for RL sampling, got {self.temperature}")
        if self.beta < 0:
            raise ConfigError(f"algo.beta must be >= 0, got {self.beta}")
        if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ConfigError(f"algo.clip_eps / clip_eps_high must be > 0, got {self.clip_eps} / {self.clip_eps_high}")
        if self.normalization not in ("token", "sequence"):
            raise ConfigError(f"algo.normalization must be 'token' or 'sequence', got {self.normalization!r}")
        for k in ("ppo_epochs", "num_minibatches", "logp_rows", "max_prompt_len"):
            if getattr(self, k) < 1:
                raise ConfigError(f"algo.{k} must be >= 1, got {getattr(self, k)}")


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, group_size: int,
                     scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion advantages (N,) and which completions to train on (N,) bool.

    Completions whose reward failed are left out and their group is normalized over the rest; a
    group with fewer than 2 valid rewards has no baseline and is dropped."""
    if bool(valid.all()):
        return grpo_advantages(rewards, group_size, scale=scale), valid.clone()
    adv = torch.zeros_like(rewards)
    keep = torch.zeros_like(valid)
    for s in range(0, rewards.numel(), group_size):
        v = valid[s:s + group_size]
        k = int(v.sum())
        if k >= 2:
            idx = torch.nonzero(v).squeeze(1) + s
            adv[idx] = grpo_advantages(rewards[idx], k, scale=scale)
            keep[idx] = True
    return adv, keep


@register
class GRPO(OnlineStage):
    name = "grpo"
    Options = GRPOOptions

    def setup(self, model: nn.Module, device: torch.device) -> list[nn.Module]:
        if self.opts.beta > 0:
            self.reference = Reference(model, use_lora=self.cfg.lora is not None)
        self.build_backend(model, self.opts.num_generations)
        return []

    def rollout(self, model: nn.Module, examples: list[RLExample]) -> list[dict[str, Any]]:
        o, tc = self.opts, self.cfg.training
        G = o.num_generations
        with self.timings("generation"):
            groups = self.sample(model, examples, G)
        comps = [c for g in groups for c in g]  # (B * G), each prompt's G completions contiguous
        prompts = [e.prompt_ids for e in examples for _ in range(G)]
        with self.timings("reward"):
            rewards, valid = score_with_fn(self.reward_fn, [c.text for c in comps],
                                           [e.answer for e in examples for _ in range(G)], o.reward_kwargs)
            adv, keep = group_advantages(rewards, valid, G, o.scale_rewards)
        stats = completion_stats(comps, rewards, valid, o.accuracy_threshold)
        # groups whose G rewards are all equal carry no signal (advantage 0): watch this go to 1
        stats["zero_std_groups"] = float((rewards.view(-1, G).std(1) == 0).float().mean())
        idx = torch.nonzero(keep).squeeze(1)
        if idx.numel() == 0:
            raise RewardFailure(f"GRPO rollout: no prompt of {len(examples)} has 2 completions with a valid reward "
                                f"({int(valid.sum())} of {len(comps)} valid); check algo.reward_fn")
        batch = pack(prompts, [c.token_ids for c in comps], self.pad_id)
        batch["advantages"] = adv
        batch["rewards"] = rewards
        batch["group"] = torch.arange(len(examples)).repeat_interleave(G)  # prompt index of each row
        batch = select(batch, idx)
        with self.timings("old_logps"):
            batch["old_logps"] = rollout_logps(model, batch, o.temperature, o.logp_rows)[0]
        if self.reference is not None:
            with self.timings("reference"):
                batch["ref_logps"] = self.reference.logps(model, batch, o.temperature, o.logp_rows)
        batch["rollout_stats"] = stats
        return micro_batches(batch, o.ppo_epochs, o.num_minibatches, tc.grad_accum, self._gen)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        o = self.opts
        mask = batch["action_mask"]
        logps = action_logps(model, action_hidden(model, batch), batch, o.temperature)
        token_level = o.normalization == "token"
        # A SUM over the step's units (tokens or completions): the loop divides by their total count.
        loss, m = grpo_loss(logps, batch["old_logps"], batch["advantages"], mask, ref_logps=batch.get("ref_logps"),
                            beta=o.beta, clip_eps=o.clip_eps, clip_eps_high=o.clip_eps_high,
                            normalization=o.normalization, num_tokens=1.0 if token_level else None)
        m.pop("ratio", None)
        if token_level:
            total, count = loss, mask.sum()
        else:
            total, count = loss * mask.shape[0], mask.any(-1).sum()
        with torch.no_grad():
            d = batch["old_logps"] - logps  # k3 estimate of KL(π_old || π): how far this rollout's steps moved
            m["approx_kl"] = masked_mean(torch.exp(d) - d - 1, mask)
        return LossOutput(total, count, {**m, **batch.get("rollout_stats", {})})

    def _eval_scores(self, examples: list[RLExample], comps: list[Completion]):
        rewards, valid = score_with_fn(self.reward_fn, [c.text for c in comps], [e.answer for e in examples],
                                       self.opts.reward_kwargs)
        return rewards >= self.opts.accuracy_threshold, rewards, valid
