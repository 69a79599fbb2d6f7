"""The OpenAI schema (and vLLM's extra sampling fields), as Pydantic v2 models.

Requests are strict where it matters: known fields reject wrong types (`max_tokens: "abc"`,
`stream: "yes"`, `temperature: true`), NaN/inf and out-of-range values, so the server answers
400 naming the field. Unknown fields are allowed (OpenAI adds fields often) and ignored.
`sampling_params()` turns a request into the engine's `SamplingParams`.
Responses and stream chunks follow OpenAI's shapes; errors are `{"error": {message, type, param, code}}`.
"""
from __future__ import annotations

import time
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from cluster.types import REPETITION_PENALTY, SamplingParams

MAX_N = 128  # completions per prompt (OpenAI's limit): the most `api.max_n` may allow (seeds count on it)
MAX_LOGPROBS = 20  # the sampler's most: the most `api.max_logprobs` may allow
# (the configured ceilings below these, and the stop strings', are checked in limits.py)

PositiveInt = Annotated[StrictInt, Field(ge=1)]
Prompt = Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _SamplingFields(_Request):
    """Fields completions and chat share: OpenAI's and vLLM's extras."""

    model: StrictStr
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1 - MAX_N)] | None = None  # torch's seed range
    user: StrictStr | None = None
    # vLLM extras that load generators send
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[StrictFloat, Field(ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value):
        if not (value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))):
            raise ValueError("stop must be a string or a list of strings")
        stops = [value] if isinstance(value, str) else (value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's extension: every content chunk carries the usage so far (load tools count tokens per chunk)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """ValueError (naming the SamplingParams field) if the combination is invalid."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n, temperature=_default(self.temperature, 1.0), top_p=_default(self.top_p, 1.0),
            top_k=_default(self.top_k, -1), min_p=_default(self.min_p, 0.0), seed=self.seed,
            presence_penalty=_default(self.presence_penalty, 0.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0),
            repetition_penalty=_default(self.repetition_penalty, 1.0), max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


def _default(value, default):
    return default if value is None else value


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    best_of: PositiveInt | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt_shape(cls, value):
        if isinstance(value, str) or (isinstance(value, list) and (
                all(isinstance(p, str) for p in value) or all(_is_token(t) for t in value)
                or all(isinstance(p, list) and all(_is_token(t) for t in p) for p in value))):
            return value
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token id lists")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, str):
            return value if value else _fail("prompt must not be empty")
        if not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("prompt token id lists must not be empty")
        if isinstance(value[0], str) and any(not p for p in value):
            raise ValueError("prompt strings must not be empty")
        return value

    @field_validator("echo")
    @classmethod
    def _check_echo(cls, value):
        return _fail("echo=true is not supported") if value else value

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, value):
        return _fail("suffix is not supported") if value else value

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt, text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def sampling_params(self) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported")
        return self._sampling(self.max_tokens, self.logprobs)


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_parts(cls, value):
        if not (value is None or isinstance(value, (str, list))):
            raise ValueError("content must be a string or a list of text parts")
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts are supported")
        return value

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content

    def for_template(self) -> dict:
        extra = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        # no content (OpenAI allows it, e.g. an assistant turn that only called a tool) renders as empty
        text = self.text()
        return {**extra, "role": self.role, "content": "" if text is None else text,
                **({"name": self.name} if self.name else {})}


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, logprobs)


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(message: str):
    raise ValueError(message)


# -- responses ----------------------------------------------------------------------
class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Response):
    content: list[ChatLogprob] | None = None


class ChatResponseMessage(_Response):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class DeltaMessage(_Response):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "llm-cluster"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


class HealthResponse(_Response):
    """`/health`: `ok` (200), or `draining` / `unhealthy` (503, with the error) so a load balancer stops sending."""

    status: Literal["ok", "draining", "unhealthy"]
    error: ErrorInfo | None = None


class AddInstanceRequest(_Request):
    role: Literal["prefill", "decode", "mixed"] = "decode"


class AddInstanceResponse(_Response):
    instance_id: str
