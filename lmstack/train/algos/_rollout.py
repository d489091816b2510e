"""Shared machinery of the online RL stages (PPO, GRPO): prompts in, ready tensors out.

- RL prompt data: records with `prompt` (a string or a list of messages) + `answer`, or OpenAI
  `messages` / sharegpt `conversations` (a trailing assistant turn is dropped: it is the
  reference solution, not part of the prompt), rendered through the chat template with
  add_generation_prompt=True.
- Rollouts go through the lmstack engine running on the LIVE policy module (`LLM.from_model`
  shares the weights, nothing is copied); the prefix cache is reset before every rollout because
  the weights changed since the last one (cached K/V would belong to the old policy).
- Sequences are packed right-padded: tokens (N, T); `action_mask` (N, T-1) marks the positions
  whose next token is a completion token (position t predicts token t+1), which is where log-probs,
  values, rewards and advantages live.
- Log-probs use the training forward and the chunked log-softmax of losses.token_logps on the
  completion positions only: never full-vocabulary logits of every position of every sequence.
- Reward functions are Python callables named by a dotted path, `reward(completion, answer) ->
  float`; one that raises or returns NaN/inf is a counted skip with a warning, never a NaN loss.
"""
from __future__ import annotations

import importlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lmstack.config import ConfigError
from lmstack.log import logger
from lmstack.train.algos import Stage
from lmstack.train.algos._pref import adapters_disabled
from lmstack.train.algos.sft import lm_head_for_loss
from lmstack.train.data import DataError, iter_files, to_messages
from lmstack.train.losses import token_logps


# ----------------------------------------------------------------------------- prompt data
@dataclass
class RLExample:
    """One RL prompt: its token ids (chat-rendered, ready to generate from) and what scores it."""

    prompt_ids: list[int]
    messages: list[dict[str, str]]  # the conversation up to the generation point
    answer: Any = None  # passed to the reward function (None when the record has no `answer`)


def record_messages(rec: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The prompt conversation of one RL record (trailing assistant turns removed)."""
    if "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, str):
            msgs = [{"role": "user", "content": p}]
            if rec.get("system"):
                msgs.insert(0, {"role": "system", "content": str(rec["system"])})
        elif isinstance(p, list):
            msgs = to_messages({"messages": p}, "messages", where)
        else:
            raise DataError(f"{where}: column 'prompt' must be a string or a list of messages, got {type(p).__name__}")
    elif "messages" in rec:
        msgs = to_messages(rec, "messages", where)
    elif "conversations" in rec:
        msgs = to_messages(rec, "sharegpt", where)
    else:
        raise DataError(f"{where}: an RL prompt record needs a 'prompt' (string or messages), 'messages' or "
                        f"'conversations' column; columns present: {sorted(rec)}")
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] not in ("user", "tool"):
        raise DataError(f"{where}: the prompt conversation must end with a user turn")
    return msgs


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], chat_template: bool = True) -> list[int]:
    if not chat_template:
        text = "\n".join(m["content"] for m in messages)
        return list(tokenizer.encode(text, add_special_tokens=True))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes BOS itself where the model wants one; adding specials would double it.
    return list(tokenizer.encode(text, add_special_tokens=False))


def load_rl_prompts(paths: Sequence[str], tokenizer: Any, max_prompt_len: int,
                    chat_template: bool = True) -> list[RLExample]:
    """Read RL prompt records; prompts longer than `max_prompt_len` tokens are skipped (counted)."""
    out: list[RLExample] = []
    too_long = 0
    for where, rec in iter_files(paths):
        msgs = record_messages(rec, where)
        ids = render_prompt(tokenizer, msgs, chat_template)
        if len(ids) > max_prompt_len:
            too_long += 1
            continue
        out.append(RLExample(ids, msgs, rec.get("answer")))
    if too_long:
        logger.warning("%d RL prompts longer than algo.max_prompt_len=%d tokens were skipped", too_long, max_prompt_len)
    if not out:
        raise DataError(f"{list(map(str, paths))}: no usable RL prompts ({too_long} longer than "
                        f"algo.max_prompt_len={max_prompt_len})")
    return out


# ----------------------------------------------------------------------------- rewards
def load_callable(path: str, what: str = "algo.reward_fn") -> Callable[..., Any]:
    """'package.module:function' (or 'package.module.function') -> the function."""
    mod_name, sep, attr = path.partition(":")
    if not sep:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ConfigError(f"{what} {path!r} must look like 'package.module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{what} {path!r}: cannot import module {mod_name!r} ({e})") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(f"{what} {path!r}: module {mod_name!r} has no function {attr!r}")
    return fn


class RewardFailure(RuntimeError):
    """Every completion of a rollout failed to get a reward: the reward function is broken."""


def score_with_fn(fn: Callable[..., Any], texts: list[str], answers: list[Any],
                  kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (N,) float32 and a validity mask (N,) bool. A call that raises or returns a value that
    is not a finite number is skipped (reward 0, invalid) and counted in one warning per rollout."""
    kwargs = kwargs or {}
    rewards = torch.zeros(len(texts), dtype=torch.float32)
    valid = torch.ones(len(texts), dtype=torch.bool)
    first_error = None
    for i, (t, a) in enumerate(zip(texts, answers)):
        try:
            r = float(fn(t, a, **kwargs))
            if not math.isfinite(r):
                raise ValueError(f"returned {r}")
            rewards[i] = r
        except Exception as e:  # a user function: any failure is a skip, reported below
            valid[i] = False
            if first_error is None:
                first_error = f"{type(e).__name__}: {e}"
    bad = int((~valid).sum())
    if bad == len(texts) and texts:
        raise RewardFailure(f"the reward function failed on all {bad} completions of this rollout "
                            f"(first error: {first_error})")
    if bad:
        logger.warning("reward function failed on %d of %d completions (skipped; first error: %s)",
                       bad, len(texts), first_error)
    return rewards, valid


# ----------------------------------------------------------------------------- generation
@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS / stop token) or "length"


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Generation and old/reference log-probs run without dropout; training mode comes back after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def bf16_rollouts_supported(model: nn.Module) -> bool:
    """Whether the engine can run this policy's rollouts with bf16 linears (an fp32 module on a CPU with
    oneDNN's native bf16 path; see lmstack.engine.model_runner.ModelRunner)."""
    from lmstack.model.layers import bf16_packing_supported

    p = next(model.parameters())
    return p.dtype == torch.float32 and p.device.type == "cpu" and bf16_packing_supported()


class EngineRollout:
    """Samples completions with the lmstack engine over the live policy module (weights shared)."""

    name = "lmstack engine"

    def __init__(self, model: nn.Module, tokenizer: Any, max_num_seqs: int, max_model_len: int,
                 engine_args: dict[str, Any] | None = None) -> None:
        from lmstack.engine.llm import LLM

        args = {"max_num_seqs": max_num_seqs, "max_model_len": max_model_len, **(engine_args or {})}
        self.llm = LLM.from_model(model, tokenizer, **args)

    def generate(self, model: nn.Module, prompts: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, seeds: list[int] | None = None) -> list[list[Completion]]:
        from lmstack.engine.sampling_params import SamplingParams

        if self.llm.model is not model:
            raise RuntimeError("the rollout engine was built over a different module than the one being trained")
        # a prompt near the context limit gets fewer new tokens instead of failing the whole rollout
        room = [min(max_tokens, self.llm.max_model_len - len(p)) for p in prompts]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max(1, room[i]),
                                 seed=None if seeds is None else seeds[i]) for i in range(len(prompts))]
        self.llm.reset_cache()  # the weights changed since the last rollout: cached K/V are stale
        with eval_mode(model):
            outs = self.llm.generate(prompts, params)
        return [[Completion(list(c.token_ids), c.text, c.finish_reason or "length") for c in o.outputs] for o in outs]


# ----------------------------------------------------------------------------- packing
def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows.

    tokens, positions: (N, T); targets: (N, T-1) = tokens[:, 1:]; action_mask: (N, T-1), true at
    position t when token t+1 is a completion token (so it covers [P-1, P+C-1) for prompt length P).
    """
    N = len(prompts)
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    tokens = torch.full((N, T), pad_id, dtype=torch.long)
    action = torch.zeros(N, T - 1, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = p + c
        tokens[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        action[i, len(p) - 1: len(p) + len(c) - 1] = True
    positions = torch.arange(T, dtype=torch.long).unsqueeze(0).expand(N, T).contiguous()
    return {"tokens": tokens, "positions": positions, "targets": tokens[:, 1:].contiguous(), "action_mask": action}


def trim(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop trailing columns that are padding in every row of this (sub-)batch."""
    lengths = batch["action_mask"].long().cumsum(-1).argmax(-1) + 2  # last action position + 2 = tokens used
    T = int(lengths.max())
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and k in ("tokens", "positions"):
            out[k] = v[:, :T]
        elif isinstance(v, torch.Tensor) and v.dim() == 2:
            out[k] = v[:, :T - 1]
        else:
            out[k] = v
    return out


def select(batch: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
    """Rows `idx` of every per-sequence tensor (dim 0 == N); other entries are shared."""
    n = batch["tokens"].shape[0]
    return {k: v[idx] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v
            for k, v in batch.items()}


def micro_batches(batch: dict[str, Any], epochs: int, num_minibatches: int, grad_accum: int,
                  generator: torch.Generator) -> list[dict[str, Any]]:
    """`epochs` passes over the rollout, each a fresh permutation cut into num_minibatches x grad_accum
    micro-batches (one optimizer step per `grad_accum` of them, in order)."""
    n = batch["tokens"].shape[0]
    pieces = num_minibatches * grad_accum
    if n < pieces:  # e.g. many completions dropped for failed rewards: one sequence per micro-batch
        logger.warning("the rollout has %d sequences, fewer than algo.num_minibatches x training.grad_accum = %d "
                       "micro-batches; using %d", n, pieces, n)
        pieces = n
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for idx in perm.tensor_split(pieces):
            out.append(trim(select(batch, idx)))
    return out


# ----------------------------------------------------------------------------- log-probs
def action_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states of the positions that predict a token: (N, T-1, D)."""
    return model(batch["tokens"], batch["positions"])[:, :-1]


def action_logps(model: nn.Module, hidden: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float,
                 chunk: int = 1024) -> torch.Tensor:
    """log π(token_{t+1} | ≤ t) at the action positions, 0 elsewhere: (N, T-1) float32.

    Only the completion positions go through the LM head (chunked log-softmax), so prompt tokens
    and padding cost no vocabulary-sized logits. `temperature` is the sampling temperature: the
    probability of a sampled token must be taken under the distribution it was sampled from.
    """
    mask = batch["action_mask"]
    lp = token_logps(hidden[mask], lm_head_for_loss(model), batch["targets"][mask], chunk=chunk,
                     temperature=temperature)  # (M,)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    out[mask] = lp
    return out


@torch.no_grad()
def rollout_logps(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float, rows: int = 16,
                  value_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and optional values) of a whole rollout, `rows` sequences at a time (bounded memory)."""
    n = batch["tokens"].shape[0]
    lps = torch.zeros(batch["action_mask"].shape, dtype=torch.float32)
    vals = torch.zeros(batch["action_mask"].shape, dtype=torch.float32) if value_fn is not None else None
    dev = next(model.parameters()).device
    with eval_mode(model):
        for s in range(0, n, rows):
            sub = trim({k: v[s:s + rows].to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)})
            T1 = sub["action_mask"].shape[1]
            h = action_hidden(model, sub)
            lps[s:s + rows, :T1] = action_logps(model, h, sub, temperature).cpu()
            if value_fn is not None:
                vals[s:s + rows, :T1] = (value_fn(h, sub).float() * sub["action_mask"]).cpu()
    return lps, vals


# ----------------------------------------------------------------------------- reference policy
class Reference:
    """The frozen reference policy: a copy of the starting weights, or the LoRA base (no copy)."""

    def __init__(self, model: nn.Module, use_lora: bool) -> None:
        import copy

        self.use_lora = use_lora
        self.model: nn.Module | None = None
        if not use_lora:
            self.model = copy.deepcopy(model).eval()
            self.model.gradient_checkpointing = False
            for p in self.model.parameters():
                p.requires_grad_(False)

    def logps(self, policy: nn.Module, batch: dict[str, torch.Tensor], temperature: float, rows: int = 16) -> torch.Tensor:
        if self.model is not None:
            return rollout_logps(self.model, batch, temperature, rows)[0]
        with adapters_disabled(policy):
            return rollout_logps(policy, batch, temperature, rows)[0]


# ----------------------------------------------------------------------------- bookkeeping
@dataclass
class Timings:
    """Seconds per rollout phase, cumulative (benchmarks/rl.py prints them)."""

    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        self.phases.clear()


def rollout_seeds(n: int) -> list[int]:
    """Per-prompt sampling seeds drawn from torch's global RNG, which the loop checkpoints: a resumed
    run samples the same completions as an uninterrupted one."""
    return [int(s) for s in torch.randint(0, 2**62, (n,), dtype=torch.long)]


def completion_stats(completions: list[Completion], rewards: torch.Tensor, valid: torch.Tensor,
                     accuracy_threshold: float) -> dict[str, float]:
    r = rewards[valid]
    lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
    return {
        "reward": float(r.mean()) if r.numel() else 0.0,
        "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
        "accuracy": float((r >= accuracy_threshold).float().mean()) if r.numel() else 0.0,
        "completion_len": float(lengths.mean()),
        "truncated": float(sum(c.finish_reason == "length" for c in completions) / max(1, len(completions))),
        "reward_skipped": float((~valid).sum()),
    }


class OnlineStage(Stage):
    """What GRPO and PPO share: RL prompt data, the engine over the live policy, sampling seeds, phase
    timings and the held-out evaluation (greedy completions of eval prompts, scored by `_eval_scores`).

    Eval prompts: `data.eval` files, or the `data.eval_fraction` share the loop holds out of
    `data.train` (the same `split_eval` call, so the same examples). `training.eval_batches` > 0
    caps them at eval_batches x batch_size prompts.
    """

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        self.reward_fn = load_callable(self.opts.reward_fn)
        self.timings = Timings()
        self.backend: Any = None  # EngineRollout, built in setup (benchmarks/rl.py swaps in HF generate)
        self.reference: Reference | None = None
        self.eval_examples: list[RLExample] = []
        self._gen = torch.Generator().manual_seed(cfg.training.seed)  # minibatch permutations

    def load_dataset(self, paths: list[str], split: str) -> list[RLExample]:
        from lmstack.train.data import split_eval

        o, d = self.opts, self.cfg.data
        examples = load_rl_prompts(paths, self.tokenizer, o.max_prompt_len, o.chat_template)
        if split == "eval":
            self.eval_examples = examples
        elif not d.eval and d.eval_fraction > 0:
            self.eval_examples = split_eval(examples, d.eval_fraction, self.cfg.training.seed)[1]
        return examples

    def build_backend(self, model: nn.Module, completions_per_prompt: int) -> None:
        o, tc = self.opts, self.cfg.training
        n_seqs = tc.batch_size * tc.grad_accum * completions_per_prompt
        max_len = min(model.config.max_position_embeddings, o.max_prompt_len + o.max_tokens)
        args = dict(o.engine_args)
        if "dtype" not in args and tc.precision == "bf16" and bf16_rollouts_supported(model):
            # bf16 mixed-precision training rolls out in bf16 too (as TRL's generate under autocast): linears
            # on packed bf16 copies of the live fp32 weights; the loss's log-probs still come from training
            args["dtype"] = "bfloat16"
        self.backend = EngineRollout(model, self.tokenizer, max_num_seqs=max(n_seqs, min(len(self._eval_set()), 64)),
                                     max_model_len=max_len, engine_args=args)

    def sample(self, model: nn.Module, examples: list[RLExample], n: int, greedy: bool = False) -> list[list[Completion]]:
        o = self.opts
        return self.backend.generate(model, [e.prompt_ids for e in examples], n, o.max_tokens,
                                     temperature=0.0 if greedy else o.temperature, top_p=o.top_p, top_k=o.top_k,
                                     seeds=None if greedy else rollout_seeds(len(examples)))

    def _eval_set(self) -> list[RLExample]:
        cap = self.cfg.training.eval_batches * self.cfg.training.batch_size
        return self.eval_examples[:cap] if cap else self.eval_examples

    def _eval_scores(self, examples: list[RLExample], comps: list[Completion]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(correct (N,) bool, reward (N,), valid (N,) bool) of greedy completions."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        examples = self._eval_set()
        if not examples:
            return {}
        comps = [g[0] for g in self.sample(model, examples, 1, greedy=True)]
        correct, rewards, valid = self._eval_scores(examples, comps)
        return {"accuracy": float((correct & valid).float().mean()),
                "reward": float(rewards[valid].mean()) if bool(valid.any()) else 0.0,
                "completion_len": sum(len(c.token_ids) for c in comps) / len(comps)}


__all__ = ["RLExample", "load_rl_prompts", "render_prompt", "record_messages", "load_callable", "score_with_fn",
           "RewardFailure", "Completion", "EngineRollout", "eval_mode", "pack", "trim", "select", "micro_batches",
           "action_hidden", "action_logps", "rollout_logps", "Reference", "Timings",
           "rollout_seeds", "completion_stats", "OnlineStage"]
