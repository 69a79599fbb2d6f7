"""The one engine loop: a thread that owns a role worker (and through it the engine), used by the Ray
instance (instance.py) and the in-process client (local.py) alike.

  (1) commands (submit, reserve, abort, ...) come from other threads as callables: `post` queues
      one, `call` queues one and waits for its result; the loop runs them between steps, so
      nothing else ever touches the engine;
  (2) an iteration: run the commands, step the worker if it has work (or transfers to poll), note
      what the step did (`StepMeter`, `QueueTimes`), hand the deltas and events to the listener;
  (3) idle, the thread sleeps on the condition: 5 ms while transfers are in flight, else until a
      command (or 50 ms); `wake` cuts the sleep short (a landed transfer, a new command);
  (4) a step that raises goes to `listener.on_error`: True keeps the loop going (the in-process
      client fails its requests and serves on), False ends it (a Ray instance is then dead, and
      every request on it learns so from its next poll).
No Ray call, no pickling and no store round trip happens in here.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future

from cluster.disagg.roles import InstanceEvent, RoleWorker
from cluster.platform import bind_thread
from cluster.runtime.step_meter import QueueTimes, StepMeter
from cluster.types import TokenDelta

BUSY_POLL_S = 0.005  # idle but transfers in flight: how soon to look again
IDLE_POLL_S = 0.05


class LoopListener(ABC):
    @abstractmethod
    def on_step(self, deltas: list[TokenDelta], events: list[InstanceEvent]) -> None:
        """After every iteration (deltas and events may be empty), on the loop thread."""

    @abstractmethod
    def on_error(self, exc: Exception) -> bool:
        """A step raised: True to go on, False to stop the loop."""


class StepLoop:
    def __init__(self, worker: RoleWorker, listener: LoopListener, name: str):
        self.worker = worker
        self.engine = worker.engine
        self.listener = listener
        self.meter = StepMeter()
        self.queue_times = QueueTimes()  # submitted -> first scheduled, per request
        self.cond = threading.Condition()
        self.inbox: list[tuple[Callable, Future | None]] = []  # guarded by cond
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True, name=name)

    def start(self) -> None:
        self.thread.start()

    # -- (1) commands, from any thread ---------------------------------------------------
    def post(self, fn: Callable[[], object]) -> None:
        with self.cond:
            self.inbox.append((fn, None))
            self.cond.notify_all()

    def call(self, fn: Callable[[], object], timeout_s: float = 30.0):
        fut: Future = Future()
        with self.cond:
            self.inbox.append((fn, fut))
            self.cond.notify_all()
        return fut.result(timeout=timeout_s)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def join(self, timeout_s: float | None = None) -> None:
        self.thread.join(timeout_s)

    # -- (2)-(4) the loop -----------------------------------------------------------------
    def _run(self) -> None:
        bind_thread(self.engine.device)
        while not self.stopped:
            self._run_commands()
            try:
                deltas = self._step()
            except Exception as exc:  # noqa: BLE001 - the listener decides: fail the requests, or the instance
                if not self.listener.on_error(exc):
                    return
                deltas = []
            self.listener.on_step(deltas, self.worker.take_events())
            if not deltas and not self.engine.has_unfinished():
                with self.cond:
                    if not self.inbox and not self.stopped:
                        self.cond.wait(timeout=BUSY_POLL_S if self.worker.waiting_on_network() else IDLE_POLL_S)

    def _step(self) -> list[TokenDelta]:
        if not (self.engine.has_unfinished() or self.worker.waiting_on_network()):
            self.meter.idle()
            return []
        before = self.engine.step_stats().num_prefill_tokens
        t0 = time.perf_counter()
        deltas = self.worker.step()
        t1 = time.perf_counter()
        after = self.engine.step_stats()
        self.meter.record(t0, t1, after.num_prefill_tokens - before, ran_model=bool(deltas),
                          prompts_queued=after.prompts_queued, busy=self.engine.has_unfinished())
        self.queue_times.check(after.admitted, time.monotonic(), self.engine.active_request_ids())
        return deltas

    def _run_commands(self) -> None:
        with self.cond:
            commands, self.inbox = self.inbox, []
        if not commands:
            return
        t0 = time.perf_counter()
        for fn, fut in commands:
            try:
                result = fn()
            except Exception as exc:  # a bad command fails its caller, not the instance
                if fut is not None:
                    fut.set_exception(exc)
            else:
                if fut is not None:
                    fut.set_result(result)
        self.meter.add_commands(time.perf_counter() - t0)
