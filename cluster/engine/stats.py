"""What an engine reports about itself: typed, read by the runtime's step loop and heartbeat."""
from __future__ import annotations

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
