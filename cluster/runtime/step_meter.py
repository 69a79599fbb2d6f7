"""What an instance's step loop measures between two heartbeats (`InstanceActor.stats` drains it).

  step times     the mean wall time of the steps that ran the model, and of those that prefilled
                 nothing (a colocated instance's decode steps: what its streams' inter-token latency is
                 set against);
  prefill rate   prompt tokens scheduled over the window's wall time, counted only if every step of
                 the window left prompts queued: the rate a queue drains at, a mixed instance's decodes
                 included. Not per step: with async scheduling a step's call waits for the step before,
                 so a prompt step after a decode step read as 10x the GPU's FLOP/s (2xH200), and a lone
                 prompt's step runs at a fraction of a queue's rate (a sixth on the CPU proxy);
  stalls         the longest model step, the longest wait between two model steps while requests were
                 running (commands, landing KV, emitting), and the time spent on commands between steps.
                 Idle time is not a stall: the loop forgets its last step's end when it goes idle (the
                 sixth session's "1.1 s gaps" were each sweep's idle start counted as one).

`QueueTimes` keeps the other figure the heartbeat drains: each request's wait from its submission to
the first step that scheduled it (the queue-time histogram of cluster/metrics.py).

The loop thread records and a Ray thread drains StepMeter without a lock: a heartbeat that drains mid-step may
split that step's figures between two windows. They are advice to admission and the router, not counts.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping


class StepMeter:
    def __init__(self):
        self.num_steps = 0
        self.step_time_s, self.num_timed_steps = 0.0, 0
        self.decode_time_s, self.num_decode_steps = 0.0, 0
        self.num_prefill_tokens = 0
        self.window_start_s = time.perf_counter()
        self.window_saturated = True
        self.max_step_s = self.max_gap_s = self.commands_s = 0.0
        self.last_step_end: float | None = None

    def idle(self) -> None:
        """Nothing to run: no queue this window, and the wait for the next work is not a stall."""
        self.window_saturated = False
        self.last_step_end = None

    def record(self, t0: float, t1: float, num_prefilled: int, ran_model: bool, prompts_queued: bool, busy: bool) -> None:
        """One step from `t0` to `t1` (perf_counter seconds) that scheduled `num_prefilled` prompt tokens;
        `ran_model`: it produced deltas (not a transfer's idle poll); after it, `prompts_queued` and `busy`."""
        self.num_steps += 1
        self.num_prefill_tokens += num_prefilled
        if not prompts_queued:
            self.window_saturated = False
        if ran_model:
            self.step_time_s += t1 - t0
            self.num_timed_steps += 1
            if not num_prefilled:
                self.decode_time_s += t1 - t0
                self.num_decode_steps += 1
            self.max_step_s = max(self.max_step_s, t1 - t0)
            if self.last_step_end is not None:
                self.max_gap_s = max(self.max_gap_s, t0 - self.last_step_end)
            self.last_step_end = t1
        elif not busy:
            self.last_step_end = None

    def add_commands(self, seconds: float) -> None:
        self.commands_s += seconds

    def drain(self, now_s: float | None = None) -> dict:
        """The figures since the last drain (None where no step counted), and a new window from now."""
        now = time.perf_counter() if now_s is None else now_s
        stats = {
            "num_steps": self.num_steps,
            "mean_step_ms": self.step_time_s / self.num_timed_steps * 1e3 if self.num_timed_steps else None,
            "mean_decode_step_ms": self.decode_time_s / self.num_decode_steps * 1e3 if self.num_decode_steps else None,
            "prefill_tokens_per_s": (self.num_prefill_tokens / (now - self.window_start_s)
                                     if self.window_saturated and self.num_prefill_tokens and now > self.window_start_s
                                     else None),
            "max_step_ms": self.max_step_s * 1e3, "max_step_gap_ms": self.max_gap_s * 1e3,
            "commands_ms": self.commands_s * 1e3,
        }
        self.step_time_s, self.num_timed_steps = 0.0, 0
        self.decode_time_s, self.num_decode_steps = 0.0, 0
        self.num_prefill_tokens, self.window_start_s, self.window_saturated = 0, now, True
        self.max_step_s = self.max_gap_s = self.commands_s = 0.0
        return stats


class QueueTimes:
    """Seconds from each request's submission to the first step that scheduled it. The loop thread
    notes and checks, a Ray thread drains.

    A step costs this only the requests it took off the queue (the scheduler's `admitted`), not a look
    at every waiting one: with 4,096 queued that look took 1.7 ms a step on the CI's CPU, under overload,
    when a step can least afford it. A request aborted while queued never shows up there; every
    `PRUNE_EVERY` checks the ones that left the engine are dropped."""

    PRUNE_EVERY = 256

    def __init__(self):
        self.since: dict[str, float] = {}  # request id -> submitted at (time.monotonic()), not yet scheduled
        self.done: list[float] = []
        self.lock = threading.Lock()
        self.num_checks = 0

    def submitted(self, request_id: str, at_s: float) -> None:
        self.since[request_id] = at_s

    def check(self, admitted: Iterable[str], now_s: float, requests: Mapping) -> None:
        """After a step (`now_s`: time.monotonic()) that took the `admitted` requests off the queue (one
        that also ended within the step among them); `requests`: those the engine still holds."""
        waits = [now_s - at_s for at_s in (self.since.pop(request_id, None) for request_id in admitted)
                 if at_s is not None]
        if waits:
            with self.lock:
                self.done.extend(waits)
        self.num_checks += 1
        if self.num_checks % self.PRUNE_EVERY == 0:
            for request_id in [r for r in self.since if r not in requests]:  # aborted while queued
                del self.since[request_id]

    def drain(self) -> list[float]:
        with self.lock:
            done, self.done = self.done, []
        return done
