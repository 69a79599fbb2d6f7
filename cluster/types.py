"""Types that cross package boundaries: sampling parameters, requests and outputs.

These are plain dataclasses with no torch in them, so the scheduler, the API and
the runtime can all share them without importing the model stack.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# a penalty outside this divides or multiplies logits past float32 (5e-324 made them inf, and the
# logprobs NaN): vLLM's own range is (0, 2] in practice
REPETITION_PENALTY = (0.01, 100.0)


class Role(enum.Enum):
    """What an engine instance does with a request."""

    MIXED = "mixed"  # prefill and decode in one engine (colocated baseline)
    PREFILL = "prefill"  # runs the prompt, returns the first token, hands over KV
    DECODE = "decode"  # admits requests whose KV already sits in its blocks


class FinishReason(enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"  # the cluster could not finish it (the error says why)
    PREFILLED = "prefilled"  # prefill role: first token out, KV handed over


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Same names and meanings as vLLM / the OpenAI API."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: whole vocabulary
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per sampled token (0: only the sampled one)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "must be an integer >= 1")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", self.top_k, "must be -1 (off) or a positive integer")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        _check(_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        _check(_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "must be in [-2, 2]")
        _check(_finite(self.repetition_penalty) and REPETITION_PENALTY[0] <= self.repetition_penalty <= REPETITION_PENALTY[1],
               "repetition_penalty", self.repetition_penalty, "must be in [%g, %g]" % REPETITION_PENALTY)
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1), "max_tokens", self.max_tokens, "must be an integer >= 1")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be an integer >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens, "must not exceed max_tokens")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20), "logprobs", self.logprobs, "must be an integer in [0, 20]")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "must be an integer")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids, "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} {rule}")


@dataclass
class TokenLogprob:
    """The sampled token's logprob and the top-N alternatives at that position."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request, cumulative so far."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # which stop string / token id ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt and what engines stream per step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None


@dataclass
class TokenDelta:
    """What one step added to one completion: the unit engines stream."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    pool: str = ""  # who made it (the metrics' labels): its instance's pool and id; "" if none did (an abort)
    instance: str = ""
