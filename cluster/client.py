"""The one interface the API server talks to, whatever serves the requests.

  LocalEngineClient (runtime/local.py)   one in-process engine (colocated, tests, `generate`)
  ClusterClient     (runtime/cluster.py) the Ray cluster: router + prefill/decode pools

Methods, all called by the API server:
  generate(request_id, prompt_token_ids, params, prompt)  async iterator of TokenDelta, one per
      new token of any of the request's `n` completions; ends after every completion has a
      finish_reason; raises Overloaded before yielding anything if the request cannot be admitted;
      a delta with `error` set ends that completion with FinishReason.ERROR.
  abort(request_id)   the client went away: stop the request and free its KV everywhere (never suspends).
  info()              model name, max_model_len, tokenizer (for chat templates and token counts).
  health()            a dict; raises if the backend cannot serve.
  drain(timeout_s)    the shutdown (SIGTERM): from now on `generate` raises Overloaded(unavailable,
                      reason "draining"), the requests in flight get `timeout_s` to finish, those still
                      running then end with an error delta; returns how many that was.
  close()             stop everything this client started.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cluster.types import SamplingParams, TokenDelta


class Overloaded(RuntimeError):
    """The backend's queues are full; the API answers 429 (or 503 when draining) with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0, unavailable: bool = False, reason: str = "overloaded"):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.unavailable = unavailable
        self.reason = reason  # the rejected-requests counter's label: which limit refused it


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    tokenizer: object  # cluster.models.tokenizer.Tokenizer
    vocab_size: int


class EngineClient(ABC):
    @abstractmethod
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None) -> AsyncIterator[TokenDelta]: ...

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Must not suspend: it is called while the request is being cancelled (its client left), inside a
        cancel scope where any await is cancelled too. Work that must wait goes to a background task."""

    @abstractmethod
    def info(self) -> ModelInfo: ...

    @abstractmethod
    async def health(self) -> dict: ...

    async def drain(self, timeout_s: float) -> int:
        """See the module docstring; a client that tracks no requests has none to wait for."""
        return 0

    async def close(self) -> None:
        return None
