"""`LocalEngineClient`: one in-process `Engine` behind the `EngineClient` interface.

The engine runs in the same step loop a Ray instance uses (step_loop.py), with a mixed-role worker;
only the loop thread touches the engine. A request's life:
  (1) `generate` (on the caller's event loop) admits it against `max_pending`, raising
      `Overloaded` before anything is yielded, makes an asyncio.Queue for it and posts an
      `_Add` to the loop;
  (2) the loop thread runs it between steps: `add_request` (its ValueError / EngineOverloaded go
      back to `generate`, which raises them), or an abort;
  (3) after each step the loop hands each TokenDelta to its request's queue with
      `loop.call_soon_threadsafe`, one call per event loop per step;
  (4) `generate` yields the deltas and returns once each of the `n` completions has a finish reason;
  (5) `abort` (or a consumer that stops iterating early) posts an abort: `engine.abort`
      frees the KV and open completions end with FinishReason.ABORT;
  (6) if `engine.step` raises, every in-flight completion ends with a delta whose `error` is
      set (FinishReason.ERROR) and the engine drops those requests; later requests still run;
  (7) `drain` (the shutdown) admits nothing more (Overloaded, unavailable: HTTP 503), waits for the
      admitted requests to end, and fails those still running at its deadline as in (6);
  (8) idle, the loop sleeps on its condition; `close` stops and joins it.
Engine stats reach `Metrics` every `stats_interval_s` while busy and once on becoming idle.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field, replace

from cluster.client import EngineClient, ModelInfo, Overloaded
from cluster.config import EngineConfig
from cluster.disagg.roles import MixedWorker
from cluster.engine.engine import Engine, EngineOverloaded
from cluster.metrics import Metrics
from cluster.runtime.step_loop import LoopListener, StepLoop
from cluster.types import FinishReason, SamplingParams, TokenDelta

_ADMITTED = object()  # first queue item of a request the engine accepted
DRAIN_POLL_S = 0.05


@dataclass(frozen=True)
class LocalClientConfig:
    """How a LocalEngineClient admits requests and reports on its engine."""

    max_pending: int = 256  # requests admitted (waiting + running) at once; more get Overloaded (HTTP 429)
    retry_after_s: float = 1.0  # the Retry-After an Overloaded carries
    stats_interval_s: float = 0.5  # how often engine stats reach Metrics while busy
    pool: str = "local"  # `pool` label of this engine's metrics
    instance: str = "0"  # `instance` label of this engine's metrics

    def __post_init__(self) -> None:
        if not (isinstance(self.max_pending, int) and self.max_pending >= 1):
            raise ValueError(f"LocalClientConfig.max_pending={self.max_pending!r} must be an integer >= 1")
        if not self.retry_after_s > 0:
            raise ValueError(f"LocalClientConfig.retry_after_s={self.retry_after_s!r} must be > 0")
        if not self.stats_interval_s > 0:
            raise ValueError(f"LocalClientConfig.stats_interval_s={self.stats_interval_s!r} must be > 0")


@dataclass
class _Pending:
    """Loop-thread bookkeeping of one admitted request."""

    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    open_indices: set[int]  # completions without a finish reason yet
    submitted_s: float


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    pending: _Pending


@dataclass
class _Outbox:
    """Items for asyncio queues, sent once per event loop at the end of a loop iteration."""

    items: dict[asyncio.AbstractEventLoop, list] = field(default_factory=dict)

    def put(self, pending: _Pending, item: object) -> None:
        self.items.setdefault(pending.loop, []).append((pending.queue, item))

    def flush(self) -> None:
        for loop, items in self.items.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass
        self.items = {}


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class LocalEngineClient(EngineClient, LoopListener):
    def __init__(self, engine: Engine, config: LocalClientConfig = LocalClientConfig(),
                 metrics: Metrics | None = None, served_name: str | None = None):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        path = engine.config.model.path
        self._info = ModelInfo(served_name or engine.config.model.served_name or os.path.basename(path.rstrip("/")),
                               engine.max_model_len, engine.tokenizer, engine.vocab_size)
        self._lock = threading.Lock()
        self._admitted: set[str] = set()  # request ids admitted and not yet ended; guarded by _lock
        self._closing = False
        self._draining = False  # drain: nothing new is admitted
        self._dead: str | None = None  # why the loop stopped, if it did on its own
        self._pending: dict[str, _Pending] = {}  # loop thread only
        self._out = _Outbox()  # loop thread only: what the commands and the step put out this iteration
        self._last_stats_s = 0.0
        self._busy = False  # loop thread only: the engine had unfinished work after the last iteration
        self._stats: dict[str, float] = {}  # the latest snapshot, replaced whole by the loop thread
        if metrics is not None:
            metrics.set_pool_size(config.pool, 1, model=self._info.name)
        self._loop = StepLoop(MixedWorker(engine), self, name="engine-step-loop")
        self._loop.start()

    @classmethod
    def from_config(cls, engine_config: EngineConfig, config: LocalClientConfig = LocalClientConfig(),
                    metrics: Metrics | None = None, served_name: str | None = None,
                    progress: bool = False) -> "LocalEngineClient":
        """Load the checkpoint (and its tokenizer) into an engine and start its loop."""
        from cluster.models.tokenizer import Tokenizer

        path = engine_config.model.path
        tokenizer = Tokenizer.from_dir(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
        return cls(Engine(engine_config, tokenizer=tokenizer, progress=progress), config, metrics, served_name)

    # -- EngineClient -------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None):
        self._admit(request_id)
        pending = _Pending(asyncio.Queue(), asyncio.get_running_loop(), set(range(params.n)), time.monotonic())
        add = _Add(request_id, list(prompt_token_ids), params, prompt, pending)
        self._loop.post(lambda: self._add(add))
        done = False
        try:
            first = await pending.queue.get()
            if isinstance(first, BaseException):
                done = True  # the loop thread already forgot it
                raise first
            num_open = params.n
            while num_open:
                delta: TokenDelta = await pending.queue.get()
                if delta.finish_reason is not None:
                    num_open -= 1
                    done = num_open == 0
                yield replace(delta, pool=self.config.pool, instance=self.config.instance)  # the metrics' labels
        finally:
            if not done:  # the consumer left early (client disconnect, cancellation)
                self._loop.post(lambda: self._abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._loop.post(lambda: self._abort(request_id))

    def info(self) -> ModelInfo:
        return self._info

    async def health(self) -> dict:
        if self._dead or not self._loop.thread.is_alive():
            raise RuntimeError(f"engine loop is not running: {self._dead or 'closed'}")
        with self._lock:
            num_admitted = len(self._admitted)
        return {"status": "ok", "num_admitted": num_admitted, "draining": self._draining, **self._stats}

    async def drain(self, timeout_s: float) -> int:
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._num_admitted() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        left = self._num_admitted()
        if left:
            self._loop.post(lambda: self._fail_all(f"the server shut down: {left} request(s) still running at the "
                                                   f"drain deadline ({timeout_s} s)"))
        return left

    def _num_admitted(self) -> int:
        with self._lock:
            return len(self._admitted)

    async def close(self) -> None:
        with self._lock:
            self._closing = True
        self._loop.stop()
        await asyncio.to_thread(self._loop.join)
        self._fail_all("the engine client was closed")  # the loop is gone: this thread may touch the engine
        if self.metrics is not None:
            self.metrics.remove_instance(self.config.pool, self.config.instance, model=self._info.name)
            self.metrics.set_pool_size(self.config.pool, 0, model=self._info.name)

    def stats(self) -> dict[str, float]:
        """The latest engine stats snapshot (refreshed every step while busy and when going idle)."""
        return dict(self._stats)

    # -- submission (any thread) ------------------------------------------------------
    def _admit(self, request_id: str) -> None:
        with self._lock:
            if self._closing or self._dead:
                raise Overloaded(f"engine is not serving: {self._dead or 'closed'}",
                                 self.config.retry_after_s, unavailable=True)
            if self._draining:
                raise Overloaded("draining: the server is shutting down", self.config.retry_after_s, unavailable=True,
                                 reason="draining")
            if request_id in self._admitted:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self._admitted) >= self.config.max_pending:
                raise Overloaded(f"{len(self._admitted)} requests pending (max_pending={self.config.max_pending})",
                                 self.config.retry_after_s)
            self._admitted.add(request_id)

    def _release(self, request_id: str) -> None:
        with self._lock:
            self._admitted.discard(request_id)

    # -- commands (loop thread only) -------------------------------------------------------
    def _abort(self, request_id: str) -> None:
        pending = self._pending.pop(request_id, None)
        self.engine.abort(request_id)  # frees its KV; a no-op for unknown ids
        if pending is not None:
            for index in sorted(pending.open_indices):
                self._out.put(pending, TokenDelta(request_id, index, [], "", finish_reason=FinishReason.ABORT))
            self._release(request_id)

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params, command.prompt)
        except EngineOverloaded as exc:
            self._reject(command, Overloaded(str(exc), self.config.retry_after_s))
        except Exception as exc:  # noqa: BLE001 - ValueError (bad request) or worse: the caller raises it
            self._reject(command, exc)
        else:
            self._pending[command.request_id] = command.pending
            self._loop.queue_times.submitted(command.request_id, command.pending.submitted_s)
            self._out.put(command.pending, _ADMITTED)

    def _reject(self, command: _Add, exc: BaseException) -> None:
        self._out.put(command.pending, exc)
        self._release(command.request_id)

    # -- the loop's listener (loop thread only) -------------------------------------------
    def on_step(self, deltas: list[TokenDelta], events: list) -> None:
        for delta in deltas:
            pending = self._pending.get(delta.request_id)
            if pending is None:
                continue
            self._out.put(pending, delta)
            if delta.finish_reason is not None:
                pending.open_indices.discard(delta.index)
                if not pending.open_indices:
                    del self._pending[delta.request_id]
                    self._release(delta.request_id)
        self._out.flush()
        self._export_queue_times()
        busy = self.engine.has_unfinished()
        self._export_stats(force=self._busy and not busy)  # and once on becoming idle
        self._busy = busy

    def on_error(self, exc: Exception) -> bool:
        """A step raised: every in-flight completion ends with the error; later requests still run."""
        self._fail_all(f"engine step failed: {exc!r}")
        return True

    def _fail_all(self, message: str) -> None:
        for request_id, pending in list(self._pending.items()):
            for index in sorted(pending.open_indices):
                self._out.put(pending, TokenDelta(request_id, index, [], "", finish_reason=FinishReason.ERROR,
                                                  error=message))
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - the engine is already broken; the requests are failed anyway
                pass
            self._release(request_id)
        self._pending.clear()
        self._out.flush()

    # -- metrics (loop thread only) --------------------------------------------------------
    def _export_queue_times(self) -> None:
        """The queue time of each request the last step scheduled for the first time (step_meter.QueueTimes)."""
        seconds_each = self._loop.queue_times.drain()
        if self.metrics is not None:
            for seconds in seconds_each:
                self.metrics.observe_queue_time(self.config.pool, self.config.instance, seconds, model=self._info.name)

    def _export_stats(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats_s < self.config.stats_interval_s:
            return
        self._last_stats_s = now
        stats = self.engine.stats().as_dict()
        self._stats = stats
        if self.metrics is not None:
            self.metrics.set_engine_stats(self.config.pool, self.config.instance, stats, model=self._info.name)
