"""Latency as the clients saw it, kept for a sliding window: each pool's TTFT (the prefill or mixed
pool that made the first token) and ITL (the decode or mixed pool that made the later tokens), at a
percentile, for the autoscaler's "observed" side. The same figures the API's histograms count, read
here without a Prometheus round trip; the window is short so that a resize's effect shows soon.
"""
from __future__ import annotations

import collections
import time

from cluster.types import Role

MAX_SAMPLES = 20_000  # per pool and kind: a burst's samples are thinned to the newest


class LatencyWindow:
    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self.samples: dict[tuple[Role, str], collections.deque] = {}

    def add(self, role: Role, kind: str, seconds: float, now_s: float | None = None) -> None:
        """`kind`: "ttft" or "itl"."""
        queue = self.samples.setdefault((role, kind), collections.deque(maxlen=MAX_SAMPLES))
        queue.append((time.monotonic() if now_s is None else now_s, seconds))

    def quantile(self, role: Role, kind: str, percentile: float, now_s: float | None = None) -> float | None:
        """The `percentile` of the window's samples (None: none in the window)."""
        queue = self.samples.get((role, kind))
        if not queue:
            return None
        now = time.monotonic() if now_s is None else now_s
        while queue and queue[0][0] < now - self.window_s:
            queue.popleft()
        if not queue:
            return None
        ordered = sorted(v for _, v in queue)
        return ordered[min(len(ordered) - 1, int(len(ordered) * percentile / 100.0))]
