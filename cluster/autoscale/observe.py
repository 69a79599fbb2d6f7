"""What the autoscaler sees of each pool at a decision: plain data, made by the controller from what
the instances already report (heartbeat stats) and what the router saw (arrivals, latencies).

Nothing here is measured for the autoscaler alone: queued prompt tokens, the prefill rate of a
saturated window, running sequences, mean decode step time and KV use are the heartbeat's figures
(runtime/instance.py), arrivals are the router's dispatches, and observed TTFT/ITL are the client
streams' own (runtime/latency.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.types import Role


@dataclass(frozen=True)
class InstanceSample:
    instance_id: str
    num_queued_prefill_tokens: int = 0
    prefill_tokens_per_s: float | None = None  # the instance's measured prompt rate (None: not yet measured)
    num_running: int = 0
    mean_decode_step_ms: float | None = None  # steps that prefilled nothing, since the last heartbeat
    kv_usage: float = 0.0  # 0..1


@dataclass(frozen=True)
class PoolObservation:
    role: Role
    instances: tuple[InstanceSample, ...] = ()  # serving (draining ones are not here)
    pending_ages_s: tuple[float, ...] = ()  # scale-ups in flight: seconds since each was decided
    num_draining: int = 0
    arrivals_per_s: float = 0.0  # requests placed on this pool per second, since the last decision
    prompt_tokens_per_s: float = 0.0  # their prompt tokens per second (prefill and mixed pools)
    mean_prompt_tokens: float = 0.0
    observed_ttft_s: float | None = None  # at the SLO percentile, over the last window (prefill and mixed)
    observed_itl_s: float | None = None  # at the SLO percentile, over the last window (decode and mixed)
    gpus_per_instance: float = 1.0
    mean_output_tokens: float | None = None  # tokens of the requests that finished here since the last decision
    scale_out_s: float | None = None  # decision to serving of the pool's recent scale-ups (median; None: none yet)

    @property
    def num_actual(self) -> int:
        return len(self.instances)

    @property
    def num_pending(self) -> int:
        return len(self.pending_ages_s)

    @property
    def num_queued_prefill_tokens(self) -> int:
        return sum(i.num_queued_prefill_tokens for i in self.instances)

    @property
    def num_running(self) -> int:
        return sum(i.num_running for i in self.instances)

    @property
    def kv_used(self) -> float:
        """KV in use, in instances' worth (2.5: two and a half instances' pools full)."""
        return sum(i.kv_usage for i in self.instances)

    @property
    def idle(self) -> bool:
        return (self.arrivals_per_s == 0 and self.num_running == 0 and self.num_queued_prefill_tokens == 0)

    @property
    def gpus_held(self) -> float:
        return (self.num_actual + self.num_pending + self.num_draining) * self.gpus_per_instance


@dataclass(frozen=True)
class Observations:
    now_s: float
    pools: dict[Role, PoolObservation] = field(default_factory=dict)
