"""Request and response bodies of the OpenAI HTTP API, as pydantic models (the shapes clients expect).

Requests accept lmstack's sampling extras (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, ...)
as extra top-level fields, the way vLLM accepts them through the OpenAI client's `extra_body`.
Unknown fields are ignored (clients and SDKs send fields a server may not know, e.g. `user`).
`to_sampling_params` is the one place where an HTTP request becomes engine `SamplingParams`.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lmstack.engine.sampling_params import SamplingParams


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

    model_config = ConfigDict(extra="ignore")

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
    # lmstack / vLLM extras (extra_body)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def _common_checks(self) -> None:
        if self.logit_bias:
            raise ProtocolError("logit_bias is not supported by lmstack", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed when stream is true", param="stream_options")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ProtocolError(f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        if self.n < 1 or self.n > 128:
            raise ProtocolError(f"n must be in [1, 128], got {self.n}", param="n")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        self._common_checks()
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
                min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                logprobs=logprobs, skip_special_tokens=self.skip_special_tokens)
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

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        if self.suffix:
            raise ProtocolError("suffix is not supported by lmstack", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ProtocolError(f"best_of must equal n ({self.n}) in lmstack, got {self.best_of}", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ProtocolError(f"logprobs must be in [0, 20], got {self.logprobs}", param="logprobs")
        if self.echo and self.logprobs is not None:
            raise ProtocolError("echo together with logprobs (prompt logprobs) is not supported", param="echo")
        return self._sampling_params(max_tokens, self.logprobs)


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
    add_generation_prompt: bool = True  # lmstack/vLLM extra
    chat_template_kwargs: dict[str, Any] | None = None

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

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ProtocolError("top_logprobs requires logprobs to be true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= 20:
                raise ProtocolError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                                    param="top_logprobs")
        n_lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, n_lp)


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
