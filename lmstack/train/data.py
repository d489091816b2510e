"""Training data: files -> records -> token ids + loss masks, and a deterministic resumable sampler.

Readers yield `(line, record)` so every error can name the file, line and column. Formats:
- text: `{"text": ...}` documents, packed into fixed-length sequences with EOS between documents;
- alpaca: `instruction`, `input`, `output` (+ optional `system`, `history` of [user, assistant] pairs);
- sharegpt: `conversations` = [{"from": "human"|"gpt"|"system", "value": ...}, ...];
- messages: OpenAI `messages` = [{"role": ..., "content": ...}, ...].

SFT examples are rendered with the model's chat template and only assistant tokens (including the
end-of-turn token the template emits) are trained on. The mask is found by rendering prefixes: the
conversation up to each assistant turn with add_generation_prompt=True, then with the turn
included; the tokens between the two renders are that turn's answer.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from lmstack.config import ConfigError
from lmstack.log import logger

IGNORE = -100  # label value that contributes no loss


class DataError(ConfigError):
    """A dataset file lmstack cannot use; the message names file, line and column."""


class TokenizerLike(Protocol):
    eos_token_ids: list[int]
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False) -> Any: ...


# ----------------------------------------------------------------------------- readers
def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) from .jsonl / .json / .csv / .parquet (pyarrow, if importable)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: dataset file not found")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{p}:{i}: expected a JSON object per line, got {type(rec).__name__}")
                yield i, rec
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON array of records (or {{\"data\": [...]}})")
        for i, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise DataError(f"{p}: record {i}: expected an object, got {type(rec).__name__}")
            yield i, rec  # "line" = record index for a JSON array
    elif suffix in (".csv", ".tsv"):
        with p.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for rec in reader:
                yield reader.line_num, dict(rec)
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: only when the user's environment has it
        except ImportError:
            raise DataError(f"{p}: reading parquet needs pyarrow (pip install pyarrow) or convert to JSONL") from None
        for i, rec in enumerate(pq.read_table(p).to_pylist(), 1):
            yield i, rec
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def detect_format(rec: dict[str, Any], where: str, text_field: str = "text") -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "alpaca"
    if text_field in rec:
        return "text"
    raise DataError(
        f"{where}: cannot tell the data format from columns {sorted(rec)}; expected one of "
        f"'{text_field}' (pretraining), 'instruction'/'output' (alpaca), 'conversations' (sharegpt), 'messages'"
    )


# ----------------------------------------------------------------------------- normalisation
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "model": "assistant", "system": "system"}


def _need(rec: dict[str, Any], col: str, where: str, fmt: str) -> Any:
    if col not in rec or rec[col] is None:
        raise DataError(f"{where}: missing column {col!r} (format {fmt}; columns present: {sorted(rec)})")
    return rec[col]


def to_messages(rec: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """Normalise one alpaca / sharegpt / messages record to [{"role", "content"}, ...]."""
    msgs: list[dict[str, str]] = []
    if fmt == "alpaca":
        instruction = str(_need(rec, "instruction", where, fmt))
        output = _need(rec, "output", where, fmt)
        if rec.get("system"):
            msgs.append({"role": "system", "content": str(rec["system"])})
        for j, turn in enumerate(rec.get("history") or []):
            if not isinstance(turn, (list, tuple)) or len(turn) != 2:
                raise DataError(f"{where}: column 'history' item {j} must be a [user, assistant] pair")
            msgs += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
        extra = rec.get("input") or ""
        user = f"{instruction}\n\n{extra}" if extra else instruction
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": str(output)}]
    elif fmt == "sharegpt":
        conv = _need(rec, "conversations", where, fmt)
        if not isinstance(conv, list):
            raise DataError(f"{where}: column 'conversations' must be a list of {{from, value}} turns")
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: column 'conversations' turn {j} needs keys 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(f"{where}: column 'conversations' turn {j}: unknown role {turn['from']!r} "
                                f"(known: {sorted(_SHAREGPT_ROLES)})")
            msgs.append({"role": role, "content": str(turn["value"])})
    elif fmt == "messages":
        conv = _need(rec, "messages", where, fmt)
        if not isinstance(conv, list):
            raise DataError(f"{where}: column 'messages' must be a list of {{role, content}} messages")
        for j, m in enumerate(conv):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: column 'messages' item {j} needs keys 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: column 'messages' item {j}: unsupported role {m['role']!r}")
            msgs.append({"role": m["role"], "content": str(m["content"])})
    else:
        raise DataError(f"{where}: format {fmt!r} is not a conversation format")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    return msgs


# ----------------------------------------------------------------------------- tokenisation
@dataclass
class Example:
    """One training sequence: ids and a per-token target flag (targets[t]: ids[t] is predicted from t-1)."""

    ids: list[int]
    targets: list[bool]


def _encode(tok: TokenizerLike, text: str) -> list[int]:
    # The chat template already writes BOS where the model wants it; adding specials would double it.
    return list(tok.encode(text, add_special_tokens=False))


def _render(tok: TokenizerLike, msgs: list[dict[str, str]], gen: bool) -> str:
    out = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    if not isinstance(out, str):
        raise TypeError("apply_chat_template(tokenize=False) must return a string")
    return out


def tokenize_conversation(tok: TokenizerLike, msgs: list[dict[str, str]], where: str = "") -> Example:
    """Token ids of the rendered conversation and the mask of assistant tokens (answer + end of turn).

    Prefix renders are tokenized on their own; when each render's ids start with the previous
    render's ids (the prefix property, true for BPE templates whose turns end in a special token)
    they are used directly. Otherwise the text segments between renders are tokenized separately
    and concatenated, which keeps the mask exact at the cost of a possibly non-canonical split.
    """
    eos = set(tok.eos_token_ids or [])
    boundaries: list[tuple[str, bool]] = []  # (render text, whether the segment ending here is a target)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        boundaries.append((_render(tok, msgs[:i], gen=True), False))
        boundaries.append((_render(tok, msgs[: i + 1], gen=False), True))
    full = _render(tok, msgs, gen=False)
    if boundaries[-1][0] != full:
        boundaries.append((full, False))

    ids: list[int] = []
    targets: list[bool] = []
    prev_text, prev_ids = "", []
    for text, is_target in boundaries:
        if not text.startswith(prev_text):
            raise DataError(
                f"{where}: the chat template is not prefix-stable (rendering fewer turns does not give a prefix "
                "of rendering more), so assistant tokens cannot be located"
            )
        cur = _encode(tok, text)
        if cur[: len(prev_ids)] == prev_ids:
            seg = cur[len(prev_ids):]
        else:  # token-level prefix property fails: tokenize the new text segment alone
            seg = _encode(tok, text[len(prev_text):])
            cur = prev_ids + seg
        if is_target and eos and not any(t in eos for t in seg):
            seg = seg + [min(eos)]  # the template emits no end token: add EOS so the model learns to stop
            cur = cur + [min(eos)]
        ids += seg
        targets += [is_target] * len(seg)
        prev_text, prev_ids = text, cur
    return Example(ids, targets)


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    target_tokens: int = 0
    notes: list[str] = field(default_factory=list)


def _truncate(ex: Example, max_len: int, stats: DataStats) -> Example | None:
    if len(ex.ids) > max_len:
        stats.truncated += 1
        ex = Example(ex.ids[:max_len], ex.targets[:max_len])
    # Position 0 is never predicted; an example whose targets were all cut off teaches nothing.
    if not any(ex.targets[1:]):
        stats.dropped += 1
        return None
    return ex


def iter_files(paths: Sequence[str | Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in paths:
        for line, rec in read_records(path):
            yield f"{path}:{line}", rec


def load_sft(paths: Sequence[str | Path], tok: TokenizerLike, max_len: int, fmt: str = "auto",
             text_field: str = "text") -> tuple[list[Example], DataStats]:
    """Conversations -> truncated Examples with assistant-only targets."""
    stats = DataStats()
    out: list[Example] = []
    for where, rec in iter_files(paths):
        f = detect_format(rec, where, text_field) if fmt == "auto" else fmt
        if f == "text":
            raise DataError(f"{where}: SFT needs conversations (alpaca / sharegpt / messages), found a plain "
                            f"'{text_field}' record; use the pretrain stage for raw text")
        ex = _truncate(tokenize_conversation(tok, to_messages(rec, f, where), where), max_len, stats)
        stats.examples += 1
        if ex is not None:
            out.append(ex)
    _finish(out, stats, paths, max_len)
    return out, stats


def load_text(paths: Sequence[str | Path], tok: TokenizerLike, max_len: int, packing: bool = True,
              text_field: str = "text") -> tuple[list[Example], DataStats]:
    """Pretraining documents -> Examples. Packed: one token stream (EOS after each document) cut into
    max_len blocks (the last, shorter block is kept). Unpacked: one truncated Example per document."""
    stats = DataStats()
    eos = (tok.eos_token_ids or [None])[0]
    if eos is None:
        raise DataError("the tokenizer has no EOS token; pretraining needs one between documents")
    stream: list[int] = []
    out: list[Example] = []
    texts: list[str] = []

    def flush() -> None:
        # Batch-encode (the Rust tokenizer parallelises a batch) when the tokenizer offers it.
        enc = tok.encode_batch(texts, add_special_tokens=True) if hasattr(tok, "encode_batch") else \
            [tok.encode(t, add_special_tokens=True) for t in texts]
        for ids in enc:
            ids = list(ids) + [eos]
            if packing:
                stream.extend(ids)
            else:
                ex = _truncate(Example(ids, [True] * len(ids)), max_len, stats)
                if ex is not None:
                    out.append(ex)
        texts.clear()

    for where, rec in iter_files(paths):
        text = _need(rec, text_field, where, "text")
        if not isinstance(text, str):
            raise DataError(f"{where}: column {text_field!r} must be a string")
        stats.examples += 1
        if text:
            texts.append(text)
        if len(texts) >= 1024:
            flush()
    flush()
    if packing:
        for s in range(0, len(stream), max_len):
            block = stream[s: s + max_len]
            if len(block) >= 2:
                out.append(Example(block, [True] * len(block)))
    _finish(out, stats, paths, max_len)
    return out, stats


def _finish(out: list[Example], stats: DataStats, paths: Sequence[str | Path], max_len: int) -> None:
    if not out:
        raise DataError(f"{list(map(str, paths))}: no usable examples after filtering "
                        f"({stats.examples} read, {stats.dropped} had no target tokens within max_len={max_len})")
    stats.tokens = sum(len(e.ids) for e in out)
    stats.target_tokens = sum(sum(e.targets[1:]) for e in out)
    if stats.truncated:
        logger.warning("%d of %d examples were longer than max_len=%d and were truncated",
                       stats.truncated, stats.examples, max_len)
    if stats.dropped:
        logger.warning("%d examples were dropped: no assistant tokens left within max_len=%d", stats.dropped, max_len)


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministically hold out `fraction` of the examples (at least one) for evaluation."""
    if fraction <= 0:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(fraction * len(examples))))
    if n_eval >= len(examples):
        raise DataError(f"data.eval_fraction={fraction} leaves no training examples out of {len(examples)}")
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ----------------------------------------------------------------------------- batching
def collate_lm(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded (B, T) `tokens`, `positions` and `labels` (labels[t] = ids[t+1] where it is a target)."""
    import torch

    T = max(len(e.ids) for e in examples)
    B = len(examples)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids = torch.tensor(e.ids, dtype=torch.long)
        tokens[b, :n] = ids
        tgt = torch.tensor(e.targets[1:], dtype=torch.bool)
        labels[b, : n - 1] = torch.where(tgt, ids[1:], torch.full_like(ids[1:], IGNORE))
    positions = torch.arange(T, dtype=torch.long).unsqueeze(0).expand(B, T).contiguous()
    return {"tokens": tokens, "positions": positions, "labels": labels}


class ResumableSampler:
    """Endless, deterministic stream of example indices, sharded by rank.

    Epoch e visits a permutation seeded by (seed, e); `position` counts indices consumed across all
    ranks in the current epoch. Every call takes `batch * world` indices and returns this rank's
    `batch` of them, so world=2, accum=a sees exactly the examples world=1, accum=2a sees.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1):
        if n <= 0:
            raise DataError("the dataset is empty")
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.position = 0, 0
        self._perm: list[int] | None = None

    def _order(self) -> list[int]:
        if self._perm is None:
            idx = list(range(self.n))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(idx)
            self._perm = idx
        return self._perm

    def next(self, batch: int) -> list[int]:
        take = []
        for _ in range(batch * self.world):
            if self.position >= self.n:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
            take.append(self._order()[self.position])
            self.position += 1
        return take[self.rank * batch: (self.rank + 1) * batch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None
