"""What the engine returns: RequestOutput / CompletionOutput (vLLM's names), and engine statistics."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.engine.sequence import Logprob, RequestMetrics


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative text so far (whole text once finished)
    token_ids: list[int]  # cumulative generated ids
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token, when asked
    cumulative_logprob: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # what is new since the previous output of this request (for streaming)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    # per prompt token when SamplingParams.prompt_logprobs is set (entry 0 is None: nothing precedes it)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # set when processing this request raised: it was stopped alone, the others went on
    error: str | None = None


@dataclass
class EngineStats:
    num_running: int  # sequences
    num_waiting: int
    num_unfinished_requests: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_cache_usage: float  # used / total
    kv_live_tokens: int  # token slots in use that hold a live token
    prefix_cache_hit_rate: float  # over prompt tokens looked up at admission
    num_preemptions: int
    num_prompt_tokens: int  # computed (not cached) prompt tokens, cumulative
    num_generated_tokens: int  # cumulative
    num_finished_requests: int
