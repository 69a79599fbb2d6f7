"""From engine TokenDeltas to OpenAI objects: one API call in flight, and its SSE stream.

An API call (`Run`) may hold several engine requests (a completions batch of prompts, each
with `n` completions; choice index = prompt_index * n + completion index):
  (1) `start` submits every prompt at once and waits for each one's first delta, so admission
      errors (Overloaded -> 429, ValueError -> 400) surface before any byte of the response;
  (2) `deltas` yields (choice index, delta) from all of them as they arrive, timing each for
      metrics (TTFT, inter-token gaps, E2E);
  (3) `close` (the server calls it however the call ends: in `finally` of a non-stream answer,
      from the SSE response once its stream ends) aborts whatever has not finished -- the client
      went away or the stream was cancelled -- and records each admitted request's metrics once;
  (4) `completion_sse` / `chat_sse` render the deltas as `data: {...}\\n\\n` chunks, an
      optional usage chunk (stream_options.include_usage) and `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cluster.api.errors import error_body
from cluster.api.protocol import (ChatChoiceLogprobs, ChatCompletionChunk, ChatLogprob, ChatStreamChoice,
                                  CompletionChoice, CompletionLogprobs, CompletionResponse, DeltaMessage,
                                  PromptTokensDetails, TopLogprob, UsageInfo)
from cluster.client import EngineClient
from cluster.metrics import NOWHERE, Metrics, RequestRecord, Where
from cluster.types import SamplingParams, TokenDelta, TokenLogprob

DONE = "data: [DONE]\n\n"
LOGPROB_FLOOR = -9999.0  # what a logprob of -inf (or NaN) reads as in JSON


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


@dataclass
class EngineCall:
    """One prompt of an API call, as submitted to the engine."""

    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None
    params: SamplingParams
    start_s: float = field(default_factory=time.monotonic)
    first_s: float | None = None
    last_s: dict[int, float] = field(default_factory=dict)  # per completion index
    first: Where = NOWHERE  # the instance that made the first token
    last: Where = NOWHERE  # ... and the last
    gaps: list[tuple[float, Where]] = field(default_factory=list)
    generated: dict[Where, int] = field(default_factory=dict)
    finish_reasons: dict[int, tuple[str, Where]] = field(default_factory=dict)
    num_cached_tokens: int = 0
    rejected: bool = False
    recorded: bool = False

    def on_delta(self, delta: TokenDelta, now: float) -> None:
        where = (delta.pool, delta.instance)
        if delta.token_ids:
            if self.first_s is None:
                self.first_s, self.first = now, where
            if delta.index in self.last_s:
                self.gaps.append((now - self.last_s[delta.index], where))
            self.last_s[delta.index], self.last = now, where
            self.generated[where] = self.generated.get(where, 0) + len(delta.token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finish_reason is not None:
            self.finish_reasons[delta.index] = (delta.finish_reason.value, where)

    @property
    def num_generated(self) -> int:
        return sum(self.generated.values())

    @property
    def finished(self) -> bool:
        return len(self.finish_reasons) == self.params.n

    def record(self, metrics: Metrics, model: str) -> None:
        if self.recorded:
            return
        self.recorded = True
        end_s = max(self.last_s.values(), default=time.monotonic())
        metrics.observe_request(model, RequestRecord(
            e2e_s=end_s - self.start_s, num_prompt_tokens=len(self.prompt_token_ids), first=self.first, last=self.last,
            ttft_s=None if self.first_s is None else self.first_s - self.start_s, gaps=self.gaps,
            generated=self.generated,
            finish_reasons=[self.finish_reasons.get(i, ("abort", self.last)) for i in range(self.params.n)]))


class Run:
    """One API call's engine requests (steps (1)-(3) of the module docstring)."""

    def __init__(self, client: EngineClient, metrics: Metrics, model: str, calls: list[EngineCall]):
        self.client = client
        self.metrics = metrics
        self.model = model
        self.calls = calls
        self._streams: list[AsyncIterator[TokenDelta]] = []
        self._firsts: list[TokenDelta] = []
        self._iter: AsyncIterator[tuple[int, TokenDelta]] | None = None
        self._closed = False

    async def start(self) -> None:
        async def first(call: EngineCall, stream: AsyncIterator[TokenDelta]) -> TokenDelta:
            try:
                return await anext(stream)
            except Exception:
                call.rejected = True  # never admitted: counted as a rejection, not as a finished request
                raise

        self._streams = [self.client.generate(c.request_id, c.prompt_token_ids, c.params, c.prompt) for c in self.calls]
        results = await asyncio.gather(*(first(c, s) for c, s in zip(self.calls, self._streams)), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure  # `close` aborts the ones that were admitted
        self._firsts = list(results)

    def deltas(self) -> AsyncIterator[tuple[int, TokenDelta]]:
        self._iter = self._deltas()
        return self._iter

    async def _deltas(self) -> AsyncIterator[tuple[int, TokenDelta]]:
        n = self.calls[0].params.n if self.calls else 1
        for i, first in enumerate(self._firsts):
            self.calls[i].on_delta(first, time.monotonic())
            yield i * n + first.index, first
        if len(self._streams) == 1:
            async for delta in self._streams[0]:
                self.calls[0].on_delta(delta, time.monotonic())
                yield delta.index, delta
            return
        async for i, delta in _merge(self._streams):
            self.calls[i].on_delta(delta, time.monotonic())
            yield i * n + delta.index, delta

    async def close(self) -> None:
        """Record metrics, close the streams and abort what did not finish (KV freed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for call in self.calls:
            if not call.rejected:
                call.record(self.metrics, self.model)
        unfinished = [c.request_id for c in self.calls if not c.finished]
        try:
            if self._iter is not None:
                await self._iter.aclose()
            for stream in self._streams:
                try:
                    await stream.aclose()
                except RuntimeError:  # still running in a cancelled merge pump; it aborts itself on exit
                    pass
        finally:
            for request_id in unfinished:  # no client's abort suspends: safe while being cancelled
                await self.client.abort(request_id)

    def usage(self) -> UsageInfo:
        prompt = sum(len(c.prompt_token_ids) for c in self.calls)
        generated = sum(c.num_generated for c in self.calls)
        cached = sum(c.num_cached_tokens for c in self.calls)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


async def _merge(streams: list[AsyncIterator[TokenDelta]]) -> AsyncIterator[tuple[int, TokenDelta]]:
    """Fan-in: (stream index, delta) in arrival order; an exception in any stream is raised here."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[TokenDelta]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(tasks)
        while num_open:
            i, item = await queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # the streams are free to close after this


class TokenStrings:
    """Token id -> its text, cached (logprob entries name tokens by text)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False) if self._tokenizer else str(token_id)
            self._cache[token_id] = text
        return text

    def completion(self, logprobs: list[TokenLogprob], out: CompletionLogprobs, offset: int) -> int:
        """Append to completions-style logprobs; returns the text offset after them."""
        for lp in logprobs:
            token = self(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(_finite(lp.logprob))
            out.top_logprobs.append({self(t): _finite(v) for t, v in lp.top.items()})
            out.text_offset.append(offset)
            offset += len(token)
        return offset

    def chat(self, logprobs: list[TokenLogprob]) -> list[ChatLogprob]:
        def entry(token_id: int, value: float) -> TopLogprob:
            token = self(token_id)
            return TopLogprob(token=token, logprob=_finite(value), bytes=list(token.encode("utf-8", "replace")))

        return [ChatLogprob(**entry(lp.token_id, lp.logprob).model_dump(),
                            top_logprobs=[entry(t, v) for t, v in lp.top.items()]) for lp in logprobs]


def _finite(logprob: float) -> float:
    """JSON has no -inf: a token the sampling masked out (a bias, a penalty) reads -9999.0, as OpenAI's does."""
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def _finish(delta: TokenDelta) -> tuple[str | None, str | int | None]:
    return (delta.finish_reason.value if delta.finish_reason else None), delta.stop_reason


async def _events(run: Run, content_chunk, usage_chunk, every_token: bool = False) -> AsyncIterator[str]:
    """The body both streams share: one chunk per delta with something to say, the usage chunk
    (when `usage_chunk` makes one), `[DONE]`; an engine error ends the stream with an error event.
    `every_token` (continuous usage stats): a token whose text is still empty (part of a UTF-8
    character, a special token) gets its chunk too, since its usage counts it: a client timing
    tokens sees each one when it is made, not with the next one that has text."""
    async for index, delta in run.deltas():
        if delta.error is not None:
            yield _error_event(delta.error)
            break
        if delta.text or delta.finish_reason or delta.logprobs or (every_token and delta.token_ids):
            yield content_chunk(index, delta)
    else:
        tail = usage_chunk()
        if tail is not None:
            yield tail
    yield DONE


async def completion_sse(run: Run, response_id: str, include_usage: bool, strings: TokenStrings,
                         continuous_usage: bool = False) -> AsyncIterator[str]:
    """The completions stream; whoever serves it must `run.close()` afterwards (the SSE response does)."""
    offsets: dict[int, int] = {}

    def content(index: int, delta: TokenDelta) -> str:
        logprobs = None
        if delta.logprobs is not None:
            logprobs = CompletionLogprobs()
            offsets[index] = strings.completion(delta.logprobs, logprobs, offsets.get(index, 0))
        reason, stop_reason = _finish(delta)
        chunk = CompletionResponse(id=response_id, model=run.model, choices=[CompletionChoice(
            index=index, text=delta.text, logprobs=logprobs, finish_reason=reason, stop_reason=stop_reason)],
            usage=run.usage() if continuous_usage else None)
        return sse(chunk.model_dump_json(exclude=None if include_usage else {"usage"}))

    def usage() -> str | None:
        if not include_usage:
            return None
        return sse(CompletionResponse(id=response_id, model=run.model, choices=[], usage=run.usage()).model_dump_json())

    async for event in _events(run, content, usage, every_token=continuous_usage):
        yield event


async def chat_sse(run: Run, response_id: str, include_usage: bool, strings: TokenStrings,
                   continuous_usage: bool = False) -> AsyncIterator[str]:
    """The chat stream: a role chunk per choice, content chunks, usage, [DONE]; `run.close()` is the caller's."""
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionChunk(id=response_id, model=run.model, choices=choices, usage=usage)
                   .model_dump_json(exclude=exclude if usage is None else None))

    def content(index: int, delta: TokenDelta) -> str:
        logprobs = ChatChoiceLogprobs(content=strings.chat(delta.logprobs)) if delta.logprobs is not None else None
        reason, stop_reason = _finish(delta)
        return chunk([ChatStreamChoice(index=index, delta=DeltaMessage(content=delta.text or None), logprobs=logprobs,
                                       finish_reason=reason, stop_reason=stop_reason)],
                     run.usage() if continuous_usage else None)

    n = run.calls[0].params.n
    yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)])
    async for event in _events(run, content, lambda: chunk([], run.usage()) if include_usage else None,
                               every_token=continuous_usage):
        yield event


def _error_event(error: str) -> str:
    return sse(json.dumps(error_body(500, f"generation failed: {error}", code="engine_error")))
