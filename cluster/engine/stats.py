"""What an engine reports about itself: typed, read by the runtime's step loop and heartbeat."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_queued_prefill_tokens: int  # prompt tokens the waiting requests will compute
    kv_usage: float  # share of KV blocks in use, 0..1
    num_free_blocks: int
    num_blocks: int
    prefix_hit_rate: float
    num_prefix_queried_tokens: int
    num_prefix_hit_tokens: int
    num_preemptions: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StepStats:
    num_prefill_tokens: int  # prompt tokens scheduled since the engine started
    prompts_queued: bool  # prompt tokens are left to compute
    admitted: tuple[str, ...]  # requests the last step took off the queue for the first time


class StartupClock:
    """Seconds each phase of an engine's start took (weights, KV, warm-up, CUDA graphs ...), in order:
    what a scale-out's time is made of (the autoscaler reports it)."""

    def __init__(self):
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
