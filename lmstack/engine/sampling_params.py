"""SamplingParams: how one request is decoded. Field names and meanings follow vLLM's."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmstack.engine.structured.params import StructuredOutputsParams


class SamplingParamsError(ValueError):
    """An invalid sampling value; the message names the field, the value and the allowed range."""


GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


@dataclass
class SamplingParams:
    n: int = 1  # independent samples of the same prompt (they share its KV blocks)
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens whose probability is below min_p * max probability
    repetition_penalty: float = 1.0  # CTRL-style: divide positive / multiply negative logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI-style: subtract once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI-style: subtract per occurrence in the generated text
    seed: int | None = None  # same seed -> same output, whatever else is in the batch
    max_tokens: int | None = 16  # None -> up to the model's context length
    min_tokens: int = 0  # EOS / stop tokens are banned until this many tokens exist
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-N log-probabilities per generated token (plus the sampled one)
    # top-N log-probabilities of every prompt token after the first (plus the actual one; vLLM's name).
    # Such a request skips the prefix-cache lookup: a cached prefix has no logits to score it with.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> value added to its logit, in [-100, 100]
    # constrained decoding (JSON schema / json_object / regex / choice / grammar); a dict is converted
    structured_outputs: StructuredOutputsParams | None = None
    stop_strs: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, limit: str) -> SamplingParamsError:
            return SamplingParamsError(f"SamplingParams.{name} must be {limit}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "a finite number")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "an integer >= 0 (0 or -1 disables it)")
        if self.top_k == -1:
            self.top_k = 0
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]")
        # 0 = score the prompt only (OpenAI's echo + max_tokens=0, what lm-eval's log-likelihood sends):
        # meaningful only with prompt_logprobs, otherwise a request that does nothing
        min_max = 0 if self.prompt_logprobs is not None else 1
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < min_max):
            raise bad("max_tokens", f"an integer >= {min_max} (or None); 0 only with prompt_logprobs")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad("logprobs", "an integer >= 0 or None")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or self.prompt_logprobs < 0):
            raise bad("prompt_logprobs", "an integer >= 0 or None")
        if self.stop is None:
            self.stop_strs = []
        elif isinstance(self.stop, str):
            self.stop_strs = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_strs = list(self.stop)
        else:
            raise bad("stop", "a string or a list of strings")
        if any(s == "" for s in self.stop_strs):
            raise bad("stop", "non-empty strings")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative token ids")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    isinstance(k, int) and k >= 0 and isinstance(v, (int, float)) and -100 <= v <= 100
                    for k, v in self.logit_bias.items()):
                raise bad("logit_bias", "a dict of token id (int >= 0) -> bias in [-100, 100]")
            self.logit_bias = {k: float(v) for k, v in self.logit_bias.items()} or None
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", "a StructuredOutputsParams, a dict of its fields, or None")

    @property
    def greedy(self) -> bool:
        # vLLM's _SAMPLING_EPS: below it, logits / temperature overflows float32 (1e-50 -> inf - inf = NaN)
        # and the distribution is an argmax anyway
        return self.temperature < GREEDY_BELOW

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def clone(self, **changes: object) -> "SamplingParams":
        import dataclasses

        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d.update(changes)
        return SamplingParams(**d)
