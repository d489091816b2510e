"""PPO for language models (Schulman et al. 2017; the RLHF recipe of Ziegler et al. 2019 / Ouyang et al. 2022).

Each rollout samples completions with the lmstack engine on the live policy weights and scores them
with a trained reward model (`algo.reward_model: DIR`, the score at the last token of
prompt + completion) or a Python reward function. Per-token rewards are the KL penalty to the
frozen reference, -kl_coef · (log π_old - log π_ref), with the score added at the last completion
token. GAE(γ, λ) over a value function gives advantages (whitened over the rollout) and returns;
the policy then takes `ppo_epochs` x `num_minibatches` optimizer steps with the clipped policy loss
plus vf_coef x the clipped value loss.

The value function is a Linear(D, 1) head on the policy's final hidden states (shared backbone;
the head is an extra trainable module the loop optimises and checkpoints, saved as
`value_head.safetensors` next to the final model), or a separate model (`algo.value_model: DIR`,
e.g. the reward model folder: its score head starts the value function).

    lmstack train ppo configs/ppo.yaml
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.config import ConfigError
from lmstack.log import logger
from lmstack.train.algos import LossOutput, register
from lmstack.train.algos._rollout import (
    Completion, OnlineStage, Reference, RewardFailure, RLExample, action_hidden, action_logps, completion_stats,
    eval_mode, micro_batches, pack, rollout_logps, score_with_fn, select, trim)
from lmstack.train.losses import gae, masked_mean, ppo_policy_loss, ppo_value_loss, whiten


@dataclass
class PPOOptions:
    """`algo:` keys of `lmstack train ppo` (defaults follow common RLHF practice; TRL's PPO uses
    kl_coef 0.05, γ 1, λ 0.95, clip 0.2, vf_coef 0.1, 4 epochs)."""

    reward_model: str | None = None  # a reward-model folder (lmstack train rm); None -> reward_fn
    reward_fn: str = "lmstack.tasks.arith:reward"  # reward(completion: str, answer) -> float
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    missing_eos_penalty: float = 0.0  # subtracted from the score of completions cut at max_tokens
    value_model: str | None = None  # separate value model folder; None -> a value head on the policy
    num_generations: int = 1  # completions per prompt
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_len: int = 512
    chat_template: bool = True
    accuracy_threshold: float = 1.0  # accuracy = share of completions whose reward_fn value >= this
    kl_coef: float = 0.05  # per-token KL penalty to the reference in the reward; 0 -> no reference kept
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2  # policy ratio clip
    clip_range_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1
    whiten_rewards: bool = False  # rescale the per-token rewards over the rollout (level kept)
    ppo_epochs: int = 4
    num_minibatches: int = 1
    logp_rows: int = 16
    engine_args: dict[str, Any] = field(default_factory=dict)  # as GRPO's ({"dtype": "bfloat16"}: bf16 rollouts)

    def __post_init__(self) -> None:
        for k in ("num_generations", "max_tokens", "ppo_epochs", "num_minibatches", "logp_rows", "max_prompt_len"):
            if getattr(self, k) < 1:
                raise ConfigError(f"algo.{k} must be >= 1, got {getattr(self, k)}")
        if self.temperature <= 0:
            raise ConfigError(f"algo.temperature must be > 0 for RL sampling, got {self.temperature}")
        if self.kl_coef < 0:
            raise ConfigError(f"algo.kl_coef must be >= 0, got {self.kl_coef}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"algo.gamma and algo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        for k in ("clip_eps", "clip_range_value"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"algo.{k} must be > 0, got {getattr(self, k)}")
        if self.vf_coef < 0:
            raise ConfigError(f"algo.vf_coef must be >= 0, got {self.vf_coef}")


class ValueHead(nn.Module):
    """V(s_t) = w · h_t + b on the policy's final hidden states. Zero-initialised: the first values
    are 0 and the critic learns from the first returns instead of from random noise."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()  # (..., D) -> (...)


class ValueModel(nn.Module):
    """A separate critic: a score-head Transformer whose score at every position is V(s_t)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = action_hidden(self.model, batch)  # (N, T-1, D)
        return self.model.compute_scores(h.to(self.model.score.weight.dtype)).squeeze(-1).float()


def _check_same_tokenizer(rm_dir: str, tok_dir: str) -> None:
    a, b = Path(rm_dir) / "tokenizer.json", Path(tok_dir) / "tokenizer.json"
    if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
        raise ConfigError(f"algo.reward_model {rm_dir}: its tokenizer differs from the policy's ({tok_dir}); the "
                          "reward model scores the policy's token ids, so both must share one tokenizer")


@register
class PPO(OnlineStage):
    name = "ppo"
    Options = PPOOptions

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        self.reward_model: nn.Module | None = None
        self.value: nn.Module | None = None

    def setup(self, model: nn.Module, device: torch.device) -> list[nn.Module]:
        from lmstack.train.algos.rm import load_reward_model

        o = self.opts
        if o.kl_coef > 0:
            self.reference = Reference(model, use_lora=self.cfg.lora is not None)
        if o.reward_model:
            _check_same_tokenizer(o.reward_model, self.cfg.model.tokenizer_dir)
            self.reward_model = load_reward_model(o.reward_model, self.pad_id, device=device).eval()
            self.reward_model.requires_grad_(False)
        if o.value_model:
            critic = load_reward_model(o.value_model, self.pad_id, device=device)
            critic.gradient_checkpointing = self.cfg.training.gradient_checkpointing
            self.value = ValueModel(critic.train().requires_grad_(True))
        else:
            self.value = ValueHead(model.config.hidden_size).to(device)
        self.build_backend(model, o.num_generations)
        return [self.value]

    # -- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def _rm_scores(self, prompts: list[list[int]], comps: list[Completion]) -> torch.Tensor:
        from lmstack.train.algos.rm import sequence_scores

        rm = self.reward_model
        dev = next(rm.parameters()).device
        out = []
        rows = self.opts.logp_rows
        for s in range(0, len(prompts), rows):
            seqs = [p + c.token_ids for p, c in zip(prompts[s:s + rows], comps[s:s + rows])]
            T = max(map(len, seqs))
            tokens = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
            for i, q in enumerate(seqs):
                tokens[i, :len(q)] = torch.tensor(q)
            batch = {"tokens": tokens.to(dev), "positions": torch.arange(T, device=dev).expand(len(seqs), T),
                     "lengths": torch.tensor([len(q) for q in seqs], device=dev)}
            out.append(sequence_scores(rm, batch).cpu())
        return torch.cat(out)

    def _score(self, prompts: list[list[int]], comps: list[Completion], answers: list[Any]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(scores, valid, correct-or-None): scores from the RM or reward_fn; `correct` from reward_fn
        when the prompts carry answers (an accuracy metric even when an RM gives the reward)."""
        texts = [c.text for c in comps]
        fn_scores = fn_valid = None
        if self.reward_model is None or any(a is not None for a in answers):
            try:
                fn_scores, fn_valid = score_with_fn(self.reward_fn, texts, answers, self.opts.reward_kwargs)
            except RewardFailure:
                if self.reward_model is None:
                    raise
        correct = None if fn_scores is None else (fn_scores >= self.opts.accuracy_threshold) & fn_valid
        if self.reward_model is not None:
            scores = self._rm_scores(prompts, comps)
            valid = torch.isfinite(scores)
            scores = torch.where(valid, scores, 0.0)
        else:
            scores, valid = fn_scores, fn_valid
        return scores, valid, correct

    # -- rollout -----------------------------------------------------------------------------
    @torch.no_grad()
    def _values(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rollout values (N, T-1) from a separate value model (the shared head's come with the log-probs)."""
        vm = self.value
        dev = next(vm.parameters()).device
        rows = self.opts.logp_rows
        out = torch.zeros(batch["action_mask"].shape, dtype=torch.float32)
        with eval_mode(vm):
            for s in range(0, out.shape[0], rows):
                sub = trim({k: v[s:s + rows].to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)})
                out[s:s + rows, :sub["action_mask"].shape[1]] = (vm(sub) * sub["action_mask"]).cpu()
        return out

    def rollout(self, model: nn.Module, examples: list[RLExample]) -> list[dict[str, Any]]:
        o, tc = self.opts, self.cfg.training
        n = o.num_generations
        with self.timings("generation"):
            groups = self.sample(model, examples, n)
        comps = [c for g in groups for c in g]
        prompts = [e.prompt_ids for e in examples for _ in range(n)]
        answers = [e.answer for e in examples for _ in range(n)]
        with self.timings("reward"):
            scores, valid, correct = self._score(prompts, comps, answers)
        stats = completion_stats(comps, scores, valid, float("-inf"))
        stats.pop("accuracy")
        if correct is not None:
            stats["accuracy"] = float(correct.float().mean())
        truncated = torch.tensor([c.finish_reason == "length" for c in comps])
        scores = scores - o.missing_eos_penalty * truncated.float()
        idx = torch.nonzero(valid).squeeze(1)
        batch = pack(prompts, [c.token_ids for c in comps], self.pad_id)
        batch["scores"] = scores
        batch = select(batch, idx)
        mask = batch["action_mask"]

        head = self.value if isinstance(self.value, ValueHead) else None
        with self.timings("old_logps"):
            old, values = rollout_logps(model, batch, o.temperature, o.logp_rows,
                                        value_fn=(lambda h, sub: head(h)) if head is not None else None)
            if values is None:
                values = self._values(model, batch)
        kl = torch.zeros_like(old)
        if self.reference is not None:
            with self.timings("reference"):
                ref = self.reference.logps(model, batch, o.temperature, o.logp_rows)
            kl = (old - ref) * mask  # k1 per-token estimate of KL(π_old || π_ref) on sampled tokens
        # Per-token reward: -β·KL at every completion token, the score added at the last one.
        rewards = -o.kl_coef * kl
        last = mask.long().cumsum(-1).argmax(-1)  # (N,) last action position of each row
        rows = torch.arange(mask.shape[0])
        rewards[rows, last] += batch["scores"]
        if o.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(rewards, values, mask, gamma=o.gamma, lam=o.lam)
        adv = whiten(adv, mask) if int(mask.sum()) >= 2 else adv
        batch.update(old_logps=old, old_values=values, advantages=adv, returns=returns)
        stats.update(score=float(batch["scores"].mean()), kl=float(kl.sum(-1).mean()),
                     non_score_reward=float((-o.kl_coef * kl).sum(-1).mean()))
        batch["rollout_stats"] = stats
        return micro_batches(batch, o.ppo_epochs, o.num_minibatches, tc.grad_accum, self._gen)

    # -- loss --------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        o = self.opts
        mask = batch["action_mask"]
        hidden = action_hidden(model, batch)
        logps = action_logps(model, hidden, batch, o.temperature)
        values = self.value(hidden) if isinstance(self.value, ValueHead) else self.value(batch)
        # Sums over the micro-batch's completion tokens (num_tokens=1); the loop divides by the step's total.
        pg, pm = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_eps=o.clip_eps,
                                 num_tokens=1.0)
        vf, vm = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip_range=o.clip_range_value,
                                num_tokens=1.0)
        n = mask.sum().clamp(min=1)
        metrics = {"pg_loss": pg.detach() / n, "vf_loss": vf.detach() / n, "clipfrac": pm["clipfrac"],
                   "approx_kl": pm["approx_kl"], "vf_clipfrac": vm["vf_clipfrac"], "values": vm["values"],
                   "returns": masked_mean(batch["returns"], mask), **batch.get("rollout_stats", {})}
        return LossOutput(pg + o.vf_coef * vf, mask.sum(), metrics)

    def _eval_scores(self, examples: list[RLExample], comps: list[Completion]):
        scores, valid, correct = self._score([e.prompt_ids for e in examples], comps, [e.answer for e in examples])
        if correct is None:  # no answers: accuracy is not defined, nothing counts as correct
            correct = torch.zeros(len(comps), dtype=torch.bool)
        return correct, scores, valid

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        if isinstance(self.value, ValueHead):
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.value.state_dict().items()},
                      str(Path(out_dir) / "value_head.safetensors"))
        elif isinstance(self.value, ValueModel):
            from lmstack.model.loading import save_model

            save_model(self.value.model, Path(out_dir) / "value_model")
        logger.info("ppo: value function saved next to %s", out_dir)
