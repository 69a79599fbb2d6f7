"""Admission past saturation: refuse now (429, Retry-After) rather than queue past the SLOs.

Past saturation a queue only grows, and every request admitted then misses its SLOs (2xH200,
2026-11-30: 1P1D at 48 req/s kept 1% of its requests within them). `ClusterClient.generate` calls
`admit` before it places a request; with the api's limits set (both off by default) it refuses:

  max_queue_wait_s    when the request would wait longer than that before its prefill starts on
                      every prefill (or mixed) instance (`queue_wait_s`: each instance's queued
                      prompt tokens, less the prefix each finds cached, over its prefill rate
                      measured on steps that left prompts queued, the median of recent
                      heartbeats); a prompt is never refused for its own length, as an idle
                      instance takes any;
  max_decode_step_ms  as every decode (or mixed) instance's steps near that (`decode_step_ms`):
                      one more stream would slow them all past their TPOT. A share of requests
                      is refused, rising from none at `SHARE_FROM` of the limit to all at it
                      (`refusal_share`): all-or-nothing, each heartbeat's step time flipped the
                      whole next second between refusing everything and admitting a burst that
                      made the next one slow (one H200, colocated, 2026-12-01: at 16 req/s a
                      third of the requests refused in whole seconds while the admitted ones kept
                      a TPOT p99 of 22 ms against a 40 ms target).

Each refusal carries its limit as the reason the rejected-requests counter is labelled with.

An instance that has not yet had a queue to measure is not unknown to it: `measure_prefill_rate`
(engine/prefill_rate.py) times one full step of prompts before the instance serves, and the router starts its rate window
with that. Without it the queue-wait limit stayed off until a heartbeat window had prompts queued
at every step: on one H200 (2026-12-01) a colocated instance at 24 req/s never had one, its queue
reached 26k tokens and half the admitted requests missed the TTFT target.
"""
from __future__ import annotations

import random

from cluster.client import Overloaded
from cluster.config import ApiConfig
from cluster.disagg.router import InstanceView

SHARE_FROM = 0.75  # of max_decode_step_ms: where refusals begin


def admit(api: ApiConfig, prefill_pool: list[InstanceView], decode_pool: list[InstanceView],
          draw=random.random) -> None:
    """Raise Overloaded if a limit of `api` refuses a request now (`draw`: uniform in [0, 1), which
    requests of a refused share are)."""
    if api.max_queue_wait_s is not None:
        wait = queue_wait_s(prefill_pool)
        if wait is not None and wait > api.max_queue_wait_s:
            raise Overloaded(f"estimated queue wait {wait:.2f} s exceeds api.max_queue_wait_s={api.max_queue_wait_s} s",
                             retry_after_s=wait - api.max_queue_wait_s, reason="queue_wait")
    if api.max_decode_step_ms is not None:
        step_ms = decode_step_ms(decode_pool)
        if step_ms is not None and draw() < refusal_share(step_ms, api.max_decode_step_ms):
            raise Overloaded(f"decode steps take {step_ms:.1f} ms against api.max_decode_step_ms={api.max_decode_step_ms} ms "
                             f"(a share of requests is refused from {SHARE_FROM:.0%} of it, all over it)",
                             retry_after_s=1.0, reason="decode_step")


def queue_wait_s(candidates: list[InstanceView], now_s: float | None = None) -> float | None:
    """The shortest wait before a prompt's prefill could start on one of `candidates`; None while one
    of them has no measured prefill rate (it may take the prompt) or there is none."""
    waits = [v.estimated_wait_s(now_s) for v in candidates if v.alive]
    return None if not waits or None in waits else min(waits)


def refusal_share(step_ms: float, limit_ms: float) -> float:
    """The share of requests refused at a decode step of `step_ms`: none up to SHARE_FROM of the limit,
    all from the limit on, in proportion between."""
    low = SHARE_FROM * limit_ms
    return min(1.0, max(0.0, (step_ms - low) / (limit_ms - low)))


def decode_step_ms(candidates: list[InstanceView]) -> float | None:
    """The fastest mean step time since the last heartbeat among `candidates` (the TPOT a new stream
    would start at); 0 if one is idle, None if there is none."""
    steps = [v.load.get("mean_step_ms") or 0.0 for v in candidates if v.alive]
    return min(steps) if steps else None
