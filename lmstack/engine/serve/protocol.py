"""Request and response bodies of the OpenAI HTTP API, as pydantic models (the shapes clients expect).

Requests accept lmstack's sampling extras (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`structured_outputs`, ...) as extra top-level fields, the way vLLM accepts them through the OpenAI
client's `extra_body`. An OpenAI field lmstack cannot honour (`audio`, `prediction`, `functions`, ...)
is a 400 naming it (UNSUPPORTED), never silently ignored; fields outside OpenAI's API are ignored.
`to_sampling_params` is the one place where an HTTP request becomes engine `SamplingParams`.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.structured.params import CONSTRAINT_FIELDS, GUIDED_FIELDS, StructuredOutputError, StructuredOutputsParams

# OpenAI request fields with no effect lmstack could give them: a 400 when sent with a non-empty value
UNSUPPORTED = ("audio", "prediction", "functions", "function_call", "web_search_options", "reasoning_effort",
               "verbosity")
MAX_LOGIT_BIAS = 1024  # entries; OpenAI's values are in [-100, 100]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ProtocolError(ValueError):
    """A request that is well-formed JSON but asks for something invalid; becomes an HTTP 400
    (or `status`) in OpenAI's error shape. `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code


# ------------------------------------------------------------------------------------------ errors
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ------------------------------------------------------------------------------------------ models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lmstack"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------ requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")  # kept in model_extra, so UNSUPPORTED fields can be refused

    model: str | None = None
    n: int = 1
    temperature: float | None = None  # OpenAI's default is 1.0
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    # lmstack / vLLM extras (extra_body)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: dict[str, Any] | None = None  # vLLM's StructuredOutputsParams fields
    # vLLM's older spellings of structured_outputs (removed in vLLM 0.12; still sent by some clients)
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None

    def _common_checks(self) -> None:
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, [], {}, ""):
                raise ProtocolError(f"{name} is not supported by lmstack", param=name)
        if self.modalities not in (None, ["text"]):
            raise ProtocolError(f"modalities must be [\"text\"] (lmstack generates text only), got {self.modalities}",
                                param="modalities")
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed when stream is true", param="stream_options")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ProtocolError(f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        if self.n < 1 or self.n > 128:
            raise ProtocolError(f"n must be in [1, 128], got {self.n}", param="n")

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float] | None:
        """OpenAI's logit_bias ({"token id": bias in [-100, 100]}) with ids checked against the vocabulary."""
        if not self.logit_bias:
            return None
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ProtocolError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}",
                                param="logit_bias")
        out = {}
        for k, v in self.logit_bias.items():
            try:
                t = int(k)
            except ValueError:
                raise ProtocolError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
            if not 0 <= t < vocab_size:
                raise ProtocolError(f"logit_bias token id {t} is outside the vocabulary [0, {vocab_size})",
                                    param="logit_bias")
            if not -100.0 <= v <= 100.0:
                raise ProtocolError(f"logit_bias values must be in [-100, 100], got {v} for token {t}",
                                    param="logit_bias")
            out[t] = float(v)
        return out

    def constraint_options(self) -> dict[str, Any]:
        """structured_outputs when it holds options only (disable_any_whitespace, ...), else {}."""
        so = self.structured_outputs
        return dict(so) if so and not set(so) & set(CONSTRAINT_FIELDS) else {}

    def constraint(self) -> StructuredOutputsParams | None:
        """The output constraint from response_format, structured_outputs or the guided_* extras (one)."""
        guided = {GUIDED_FIELDS[k]: getattr(self, k) for k in GUIDED_FIELDS if getattr(self, k) is not None}
        so = self.structured_outputs
        # structured_outputs with options only (e.g. disable_any_whitespace) tunes response_format's constraint
        options = so if (so and self.response_format is not None
                         and not set(so) & set(CONSTRAINT_FIELDS)) else None
        if options is not None:
            so = None
        given = [n for n, v in (("response_format", self.response_format), ("structured_outputs", so)) if v]
        if guided:
            given.append("guided_*")
        if len(given) > 1:
            raise ProtocolError(f"give one output constraint, not {' and '.join(given)}", param=given[1])
        try:
            if self.response_format is not None:
                c = StructuredOutputsParams.from_response_format(self.response_format)
                if c is not None and options:
                    c = StructuredOutputsParams.from_dict({**{k: getattr(c, k) for k in (c.kind, "whitespace_pattern",
                                                           "disable_additional_properties", "disable_any_whitespace")},
                                                           **options})
                return c
            if so is not None:
                return StructuredOutputsParams.from_dict(so)
            if guided and set(guided) != {"whitespace_pattern"}:
                return StructuredOutputsParams(**guided)
        except StructuredOutputError as e:
            raise ProtocolError(str(e), param=given[0] if given[0] != "guided_*" else next(
                k for k in GUIDED_FIELDS if getattr(self, k) is not None)) from e
        return None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, vocab_size: int,
                         **extra: Any) -> SamplingParams:
        self._common_checks()
        if "structured_outputs" not in extra:
            extra["structured_outputs"] = self.constraint()
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
                min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
                logit_bias=self.logit_bias_ids(vocab_size), **extra)
        except ValueError as e:
            # SamplingParams names the field as "SamplingParams.<field> must be ..."
            msg = str(e)
            param = msg.split(".", 1)[1].split(" ", 1)[0] if msg.startswith("SamplingParams.") else None
            raise ProtocolError(msg, param=param) from e


class CompletionRequest(_SamplingRequest):
    # a string, a list of strings, a list of token ids, or a list of token-id lists
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16  # OpenAI's default for the legacy completions endpoint
    logprobs: int | None = None  # top-N alternatives per token (OpenAI allows up to 5; we allow 20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ProtocolError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt as token ids
        if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
            return list(p)
        raise ProtocolError("prompt must be a string, a list of strings, or token ids", param="prompt")

    def to_sampling_params(self, max_tokens: int | None, vocab_size: int) -> SamplingParams:
        """echo + logprobs scores the prompt too (vLLM's prompt_logprobs); with max_tokens=0 only the
        prompt (what lm-eval's log-likelihood requests send)."""
        if self.suffix:
            raise ProtocolError("suffix is not supported by lmstack", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ProtocolError(f"best_of must equal n ({self.n}) in lmstack, got {self.best_of}", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ProtocolError(f"logprobs must be in [0, 20], got {self.logprobs}", param="logprobs")
        if max_tokens == 0 and not self.echo:
            raise ProtocolError("max_tokens=0 generates nothing; it is allowed only with echo", param="max_tokens")
        prompt_lp = self.logprobs if (self.echo and self.logprobs is not None) else None
        if max_tokens == 0 and prompt_lp is None:
            prompt_lp = 0  # echo of the prompt alone: the engine still needs a reason to run it
        return self._sampling_params(max_tokens, self.logprobs, vocab_size, prompt_logprobs=prompt_lp)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id, ... go to the template
    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        """Content as plain text; a list of parts must contain only text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ProtocolError(f"only text content parts are supported, got type={part.get('type')!r}",
                                    param="messages")
            out.append(part["text"])
        return "".join(out)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True  # lmstack/vLLM extra
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM extra; refused unless --trust-request-chat-template

    def template_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise ProtocolError("messages must contain at least one message", param="messages")
        out = []
        for m in self.messages:
            if m.role not in ("system", "developer", "user", "assistant", "tool"):
                raise ProtocolError(f"unknown message role {m.role!r}", param="messages")
            d = {k: v for k, v in (m.model_extra or {}).items()}
            # "developer" is OpenAI's new name for the system role; templates know only "system".
            d.update(role="system" if m.role == "developer" else m.role, content=m.text())
            out.append(d)
        return out

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int | None, vocab_size: int, **extra: Any) -> SamplingParams:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ProtocolError("top_logprobs requires logprobs to be true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= 20:
                raise ProtocolError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                                    param="top_logprobs")
        n_lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, n_lp, vocab_size, **extra)


# ------------------------------------------------------------------------------------------ responses
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # [{"id", "type": "function", "function": {name, arguments}}]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's streamed call pieces (index, id, function deltas)


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ------------------------------------------------------------------------------------------ tokenizer routes
class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered with the chat template first."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]
