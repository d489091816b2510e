"""Request and sequence state (plain Python, no torch).

A `Request` is what a user submits: one prompt and its SamplingParams. It owns `n` `Sequence`s
(one per sample). Only the first sequence is prefilled; when its prompt is done the others are
forked from it and share its KV blocks (copy-on-write for the last, partly filled block).

KV bookkeeping: `token_ids` is prompt + generated tokens; `num_computed_tokens` is how many of
them already have K/V in the paged cache. A step computes tokens [num_computed, num_computed + k);
when that reaches the end of `token_ids`, the logits of the last token are sampled and the new
token is appended (so a decode step always computes exactly one pending token).
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from lmstack.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str | None = None


class Sequence:
    def __init__(self, request: "Request", index: int, token_ids: list[int], sampling_seed: int) -> None:
        self.seq_id: int = next(_seq_counter)
        self.request = request
        self.index = index  # sample number within the request (CompletionOutput.index)
        self.token_ids: list[int] = list(token_ids)
        self.num_prompt_tokens: int = request.num_prompt_tokens
        self.num_computed_tokens: int = 0
        self.num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks, in order
        self.status = SequenceStatus.WAITING
        self.sampling_seed = sampling_seed
        # output state
        self.text: str = ""
        self.detok: Any = None  # IncrementalDetokenizer or None (token-id only engine)
        self.logprobs: list[dict[int, Logprob]] | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob: float = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_text_len = 0  # streaming: how much of `text` / tokens were already reported
        self.sent_tokens = 0
        self.num_preemptions = 0
        # structured output: a structured.grammar.GrammarMatcher over this sequence's generated tokens
        self.grammar: Any = None

    # ------------------------------------------------------------------ views
    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.value})")


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean inter-token time after the first token (seconds)."""
        if self.first_token_time is None or self.finished_time is None or self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    base_seed: int = 0  # sample i draws from a generator seeded by a mix of (base_seed, i)
    arrival_time: float = field(default_factory=time.perf_counter)
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1: children created after the prompt's prefill
    aborted: bool = False
    error: str | None = None  # processing this request raised: it was stopped alone (finish_reason "abort")

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time, num_prompt_tokens=len(self.prompt_token_ids))
        # prompt_logprobs: entry j scores prompt token j given tokens < j; entry 0 has no context (None)
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] * len(self.prompt_token_ids) if self.params.prompt_logprobs is not None else None)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return (self.forked or self.params.n == 1 or self.aborted) and all(s.is_finished for s in self.seqs)
