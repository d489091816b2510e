"""Shared pieces of the offline preference stages (rm, dpo, kto, orpo, simpo).

Data. A preference record is one of
- ``prompt`` (string or message list) + ``chosen`` + ``rejected`` (strings or message lists);
- ``messages`` (the conversation so far) + ``chosen`` + ``rejected``;
- sharegpt ``conversations`` ([{from, value}]) + ``chosen`` / ``rejected`` ({from, value} or strings);
- implicit prompt: ``chosen`` / ``rejected`` are whole conversations whose last message is the
  assistant answer (the prompt is everything before it);
optional ``margin`` (a number, for the reward model's margin loss). A KTO record has ``prompt``
(or ``messages`` / ``conversations``) + ``completion`` + ``label`` (true = desirable).

Every completion is rendered with the model's chat template as the final assistant turn
(`lmstack.train.data.tokenize_conversation`), so the completion tokens are exactly what SFT
trained on: the answer plus the end-of-turn token. A sequence is stored as ``prompt`` ids +
``completion`` ids; pairs share one prompt.

Bad data: a pair whose chosen equals rejected, or an empty completion, is skipped and counted
(one warning with the counts); a dataset left empty after filtering is an error naming the files.

Log-probs. `completion_logps` returns, per row, the sum of log π(y_t | x, y_<t) over completion
tokens and their count. Only the completion positions' hidden states go through the output
projection, chunk by chunk (`losses.token_logps`): full-vocabulary logits are never built for
every position at once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from lmstack.config import ConfigError
from lmstack.log import logger
from lmstack.train.data import IGNORE, DataError, iter_files, to_messages, tokenize_conversation
from lmstack.train.losses import token_logps

LOGP_CHUNK = 1024  # rows of (chunk, V) logits at a time


# ----------------------------------------------------------------------------- examples
@dataclass
class PrefExample:
    """One preference pair: shared prompt ids and the two completions' ids (end-of-turn included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    # reference-model summed log-probs, filled by `precompute_reference` (None = compute live)
    ref_chosen: float | None = None
    ref_rejected: float | None = None


@dataclass
class KTOExample:
    prompt: list[int]
    completion: list[int]
    label: bool
    # the mismatched completion used for the KL reference point when it is fixed per example
    # (precomputed reference); None -> the next example's completion in the batch
    kl_completion: list[int] | None = None
    ref: float | None = None
    ref_kl: float | None = None


@dataclass
class PrefStats:
    read: int = 0
    kept: int = 0
    same: int = 0  # chosen == rejected
    empty: int = 0  # empty completion
    truncated: int = 0
    too_long: int = 0  # no completion token left within max_len
    notes: list[str] = field(default_factory=list)

    def report(self, paths: Sequence[str], max_len: int) -> None:
        skipped = self.same + self.empty + self.too_long
        if skipped:
            logger.warning("%s: skipped %d of %d records (%d chosen == rejected, %d empty completions, "
                           "%d with no completion token within max_len=%d)", list(map(str, paths)), skipped,
                           self.read, self.same, self.empty, self.too_long, max_len)
        if self.truncated:
            logger.warning("%d of %d records were longer than max_len=%d; their completions were truncated",
                           self.truncated, self.read, max_len)
        if not self.kept:
            raise DataError(f"{list(map(str, paths))}: no usable examples after filtering ({self.read} read: "
                            f"{self.same} chosen == rejected, {self.empty} empty completions, {self.too_long} "
                            f"too long for max_len={max_len})")


# ----------------------------------------------------------------------------- record parsing
def _as_prompt_messages(rec: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    """The conversation before the answer, or None when the record has no explicit prompt column."""
    if "prompt" in rec and rec["prompt"] is not None:
        p = rec["prompt"]
        if isinstance(p, str):
            return [{"role": "user", "content": p}]
        if isinstance(p, list):
            return _check_msgs(p, where, "prompt")
        raise DataError(f"{where}: column 'prompt' must be a string or a list of messages, got {type(p).__name__}")
    if "messages" in rec:
        return _check_msgs(rec["messages"], where, "messages")
    if "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list):
            raise DataError(f"{where}: column 'conversations' must be a list of {{from, value}} turns")
        # reuse the sharegpt role mapping of the SFT reader (it insists on an assistant turn: add a dummy)
        msgs = to_messages({"conversations": conv + [{"from": "gpt", "value": ""}]}, "sharegpt", where)
        return msgs[:-1]
    return None


def _check_msgs(msgs: Any, where: str, col: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list):
        raise DataError(f"{where}: column {col!r} must be a list of {{role, content}} messages")
    out = []
    for j, m in enumerate(msgs):
        if isinstance(m, dict) and "from" in m and "value" in m:  # sharegpt turn
            m = {"role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]), "content": m["value"]}
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: column {col!r} item {j} needs keys 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: column {col!r} item {j}: unsupported role {m['role']!r}")
        out.append({"role": m["role"], "content": str(m["content"])})
    return out


def _completion(value: Any, where: str, col: str) -> tuple[list[dict[str, str]] | None, str]:
    """(implicit prompt or None, answer text) of a chosen / rejected / completion value."""
    if isinstance(value, str):
        return None, value
    if isinstance(value, dict):  # one sharegpt / OpenAI message
        msgs = _check_msgs([value], where, col)
        return None, msgs[0]["content"]
    if isinstance(value, list):
        msgs = _check_msgs(value, where, col)
        if not msgs or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: column {col!r} must end with an assistant message")
        if len(msgs) == 1:
            return None, msgs[0]["content"]
        return msgs[:-1], msgs[-1]["content"]
    raise DataError(f"{where}: column {col!r} must be a string or a list of messages, got {type(value).__name__}")


def _need(rec: dict[str, Any], col: str, where: str, kind: str) -> Any:
    if col not in rec or rec[col] is None:
        raise DataError(f"{where}: missing column {col!r} ({kind} data needs it; columns present: {sorted(rec)})")
    return rec[col]


def _prompt_and_answer(rec: dict[str, Any], col: str, where: str, kind: str) -> tuple[list[dict[str, str]], str]:
    explicit = _as_prompt_messages(rec, where)
    implicit, text = _completion(_need(rec, col, where, kind), where, col)
    prompt = explicit if explicit is not None else implicit
    if prompt is None:
        raise DataError(f"{where}: no prompt: give a 'prompt' (or 'messages' / 'conversations') column, or "
                        f"whole conversations in {col!r}")
    return prompt, text


# ----------------------------------------------------------------------------- tokenisation
def split_turn(tok: Any, prompt: list[dict[str, str]], answer: str, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of `prompt` + one assistant turn `answer`, via the chat template.

    The completion is the last run of target tokens of the rendered conversation (the answer and the
    end-of-turn token), cut after its last EOS token.
    """
    ex = tokenize_conversation(tok, prompt + [{"role": "assistant", "content": answer}], where)
    t = ex.targets
    end = max(i for i, x in enumerate(t) if x) + 1
    start = end
    while start > 0 and t[start - 1]:
        start -= 1
    comp = ex.ids[start:end]
    # SFT's mask may include what the template writes after the end-of-turn token ("\n" in ChatML);
    # generation stops at that token, so the completion ends there.
    eos = set(tok.eos_token_ids or [])
    last = max((i for i, t in enumerate(comp) if t in eos), default=None)
    if last is not None:
        comp = comp[: last + 1]
    return ex.ids[:start], comp


def _fit(prompt: list[int], comp: list[int], max_len: int) -> tuple[list[int], bool]:
    """Truncate the completion so prompt + completion fits max_len; (completion, truncated?)."""
    room = max_len - len(prompt)
    if len(comp) <= room:
        return comp, False
    return comp[:max(room, 0)], True


def load_pairs(paths: Sequence[str], tok: Any, max_len: int) -> list[PrefExample]:
    stats = PrefStats()
    out: list[PrefExample] = []
    for where, rec in iter_files(paths):
        stats.read += 1
        p_c, chosen = _prompt_and_answer(rec, "chosen", where, "preference")
        p_r, rejected = _prompt_and_answer(rec, "rejected", where, "preference")
        if p_c != p_r:
            raise DataError(f"{where}: 'chosen' and 'rejected' have different prompts")
        if not chosen.strip() or not rejected.strip():
            stats.empty += 1
            continue
        if chosen == rejected:
            stats.same += 1
            continue
        prompt, c_ids = split_turn(tok, p_c, chosen, where)
        prompt_r, r_ids = split_turn(tok, p_r, rejected, where)
        if prompt_r != prompt:  # the template tokenized the prompt differently before the two answers
            raise DataError(f"{where}: the prompt tokenizes differently before 'chosen' and 'rejected'")
        c_ids, tc = _fit(prompt, c_ids, max_len)
        r_ids, tr = _fit(prompt, r_ids, max_len)
        if not c_ids or not r_ids:
            stats.too_long += 1
            continue
        stats.truncated += int(tc or tr)
        margin = rec.get("margin", 0.0)
        try:
            margin = float(margin or 0.0)
        except (TypeError, ValueError):
            raise DataError(f"{where}: column 'margin' must be a number, got {margin!r}") from None
        out.append(PrefExample(prompt, c_ids, r_ids, margin))
        stats.kept += 1
    stats.report(paths, max_len)
    return out


_TRUE = ("true", "1", "yes", "desirable", "good")
_FALSE = ("false", "0", "no", "undesirable", "bad")


def _label(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise DataError(f"{where}: column 'label' must be true/false (desirable/undesirable), got {v!r}")


def load_kto(paths: Sequence[str], tok: Any, max_len: int) -> list[KTOExample]:
    stats = PrefStats()
    out: list[KTOExample] = []
    for where, rec in iter_files(paths):
        stats.read += 1
        prompt_msgs, text = _prompt_and_answer(rec, "completion", where, "KTO")
        label = _label(_need(rec, "label", where, "KTO"), where)
        if not text.strip():
            stats.empty += 1
            continue
        prompt, ids = split_turn(tok, prompt_msgs, text, where)
        ids, t = _fit(prompt, ids, max_len)
        if not ids:
            stats.too_long += 1
            continue
        stats.truncated += int(t)
        out.append(KTOExample(prompt, ids, label))
        stats.kept += 1
    stats.report(paths, max_len)
    return out


def check_kto_labels(examples: Sequence[KTOExample], where: str) -> None:
    n_d = sum(e.label for e in examples)
    if n_d == 0 or n_d == len(examples):
        which = "desirable" if n_d else "undesirable"
        raise DataError(f"{where}: KTO data has only {which} examples ({len(examples)} of them); KTO needs both "
                        "desirable (label true) and undesirable (label false) completions")


# ----------------------------------------------------------------------------- batching
def collate_sequences(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt, completion) id lists -> right-padded (R, T) tokens / positions / labels / lengths.

    labels[r, t] = tokens[r, t + 1] where that token is a completion token, else IGNORE.
    """
    if any(len(p) == 0 for p, _ in seqs):
        raise DataError("an example has an empty prompt (the completion must be predicted from something)")
    R = len(seqs)
    T = max(len(p) + len(c) for p, c in seqs)
    tokens = torch.full((R, T), pad_id, dtype=torch.long)
    labels = torch.full((R, T), IGNORE, dtype=torch.long)
    lengths = torch.empty(R, dtype=torch.long)
    for r, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        tokens[r, :n] = torch.tensor(p + c, dtype=torch.long)
        labels[r, len(p) - 1: n - 1] = torch.tensor(c, dtype=torch.long)
        lengths[r] = n
    positions = torch.arange(T, dtype=torch.long).unsqueeze(0).expand(R, T).contiguous()
    return {"tokens": tokens, "positions": positions, "labels": labels, "lengths": lengths}


def collate_pairs(examples: Sequence[PrefExample], pad_id: int) -> dict[str, torch.Tensor]:
    """2B rows: the B chosen sequences, then the B rejected ones (one forward for both)."""
    batch = collate_sequences([(e.prompt, e.chosen) for e in examples] + [(e.prompt, e.rejected) for e in examples],
                              pad_id)
    batch["margin"] = torch.tensor([e.margin for e in examples], dtype=torch.float32)
    if all(e.ref_chosen is not None for e in examples):
        batch["ref_chosen"] = torch.tensor([e.ref_chosen for e in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([e.ref_rejected for e in examples], dtype=torch.float32)
    return batch


def collate_kto(examples: Sequence[KTOExample], pad_id: int) -> dict[str, torch.Tensor]:
    """2B rows: the B (prompt, completion) sequences, then B mismatched (prompt_i, completion_j) ones.

    The mismatched completion is the example's fixed `kl_completion` when set (precomputed
    reference), else the next example's completion in the batch (shift by one, Ethayarajh et al.
    2024 sec. 4.1: a batch of B gives B mismatched pairs at no extra data cost).
    """
    B = len(examples)
    if B < 2 and any(e.kl_completion is None for e in examples):
        raise ConfigError("KTO needs training.batch_size >= 2: its KL reference point pairs each prompt with "
                          "another example's completion from the same batch")
    kl = [e.kl_completion if e.kl_completion is not None else examples[(i + 1) % B].completion
          for i, e in enumerate(examples)]
    batch = collate_sequences([(e.prompt, e.completion) for e in examples]
                              + [(e.prompt, k) for e, k in zip(examples, kl)], pad_id)
    batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    if all(e.ref is not None for e in examples):
        batch["ref"] = torch.tensor([e.ref for e in examples], dtype=torch.float32)
        batch["ref_kl"] = torch.tensor([e.ref_kl for e in examples], dtype=torch.float32)
    return batch


# ----------------------------------------------------------------------------- log-probs
def lm_head_for_loss(model: nn.Module) -> torch.Tensor | nn.Module:
    from lmstack.train.algos.sft import lm_head_for_loss as _h

    return _h(model)


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor],
                     chunk: int = LOGP_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed completion log-probs (R,) float32 and completion token counts (R,).

    Only the hidden states at completion positions are projected to the vocabulary (chunked),
    so the cost is O(completion tokens x V), never (R, T, V).
    """
    hidden = model(batch["tokens"], batch["positions"])  # (R, T, D)
    labels = batch["labels"]
    mask = labels != IGNORE  # (R, T)
    h = hidden[mask]  # (N, D) completion positions only
    lp = token_logps(h, lm_head_for_loss(model), labels[mask], chunk=chunk)  # (N,)
    rows = mask.nonzero()[:, 0]
    R = labels.shape[0]
    sums = torch.zeros(R, dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return sums, mask.sum(-1).to(lp.dtype)


# ----------------------------------------------------------------------------- reference model
@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily zero every LoRA update: with LoRA the frozen base IS the reference model."""
    from lmstack.model.lora import lora_modules

    mods = list(lora_modules(model).values())
    saved = [m.scaling for m in mods]
    for m in mods:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.scaling = s


class Reference:
    """Where reference log-probs come from: a frozen copy, the LoRA base with adapters off, or nothing
    (values precomputed into the examples)."""

    def __init__(self, model: nn.Module | None, policy: nn.Module | None = None) -> None:
        self.model = model  # a frozen copy (live), or None
        self.policy = policy  # the LoRA policy whose base is the reference, or None

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.model is not None:
            return completion_logps(self.model, batch)[0]
        if self.policy is not None:
            with adapters_disabled(self.policy):
                return completion_logps(self.policy, batch)[0]
        raise RuntimeError("no reference model and no precomputed reference log-probs in the batch")


def load_reference(path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    from lmstack.model.loading import load_model

    ref = load_model(path, dtype=dtype, device=device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def autocast_for(cfg: Any, device: torch.device):
    if cfg.training.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def precompute(examples: Sequence[Any], collate, ref: Reference, store, batch_size: int, device: torch.device,
               autocast_ctx_fn) -> None:
    """Run the reference once over `examples` (in order, `batch_size` at a time) and `store(examples, logps)`."""
    for s in range(0, len(examples), batch_size):
        chunk = list(examples[s: s + batch_size])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(chunk).items()}
        with autocast_ctx_fn():
            lp = ref.logps(batch).float().cpu()
        store(chunk, lp)


def has_lora(model: nn.Module) -> bool:
    from lmstack.model.lora import lora_modules

    return bool(lora_modules(model))


# ----------------------------------------------------------------------------- shared stage bases
class EvalMetrics:
    """Averages the metrics of the loss calls made in eval mode.

    The loop's `evaluate` runs `stage.loss` over the held-out batches (model in eval mode) and then
    calls `stage.evaluate(model)`; stages record their eval-mode metrics here and report the
    averages there (e.g. held-out preference accuracy).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0.0

    def add(self, metrics: dict[str, Any], weight: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
        self.n += weight

    def pop(self) -> dict[str, float]:
        out = {k: v / self.n for k, v in self.sums.items()} if self.n else {}
        self.sums, self.n = {}, 0.0
        return out


class PairStage:
    """Mixin for stages trained on preference pairs (rm, dpo, orpo, simpo)."""

    EVAL_KEYS = ("rewards/accuracies", "rewards/margins")

    def load_dataset(self, paths: list[str], split: str) -> list[PrefExample]:
        data = load_pairs(paths, self.tokenizer, self.cfg.data.max_len)
        self._datasets = getattr(self, "_datasets", []) + [data]
        return data

    def collate(self, examples: list[PrefExample]) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, self.pad_id)

    def _record(self, model: nn.Module, metrics: dict[str, Any], n: int) -> None:
        if not model.training:
            if not hasattr(self, "_eval"):
                self._eval = EvalMetrics()
            self._eval.add({k: v for k, v in metrics.items() if k in self.EVAL_KEYS}, n)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        ev = getattr(self, "_eval", None)
        return {k.replace("rewards/", "").replace("accuracies", "accuracy"): v
                for k, v in (ev.pop() if ev else {}).items()}


def reference_for(stage: Any, model: nn.Module, device: torch.device, ref_path: str) -> Reference:
    """The reference model of a DPO / KTO run: `ref_path` if given, else the starting checkpoint
    (with LoRA: the frozen base with adapters off, no copy; with precompute: the policy itself,
    which at step 0 equals the starting checkpoint)."""
    if ref_path:
        return Reference(load_reference(ref_path, device))
    if has_lora(model):
        return Reference(None, policy=model)
    if getattr(stage.opts, "precompute_ref", False):
        return Reference(model)
    if stage.cfg.model.path is None:
        raise ConfigError("a reference model is needed: set model.path or algo.ref_model")
    return Reference(load_reference(stage.cfg.model.path, device))
