"""Placement: which prefill instance runs a prompt, which decode instance continues it.

  load policy (default)
    prefill: least (queued prefill tokens - prefix-cache hit tokens x weight), where hits come
             from the store's prefix index (block chain hashes -> instances);
    decode:  most free KV blocks among those with room for the prompt, fewest running;
  round_robin: cycles, for comparison.

The router keeps a local tally of what it dispatched since the last heartbeat asked for an
instance's stats, so a burst between two heartbeats spreads instead of piling onto the instance
that looked idlest. A dispatch made while a heartbeat's request was on its way may be in those
stats or not; it stays counted until the next one (counted twice for a beat at worst, never lost).
"""
from __future__ import annotations

import collections
import itertools
import statistics
import time
from dataclasses import dataclass, field

from cluster.config import RouterConfig
from cluster.types import Role


# Heartbeats whose prefill rates make an instance's estimate. The median, not a running mean: one slow
# window (a collection, a step that waited on something else) halved a running mean, and the queue-wait
# admission then refused requests an idle instance could have taken at once.
RATE_WINDOW = 8


@dataclass
class InstanceView:
    instance_id: str
    role: Role
    handle: object
    block_size: int = 16
    num_blocks: int = 0
    load: dict = field(default_factory=dict)  # last heartbeat's engine stats
    sent: collections.deque = field(default_factory=collections.deque)  # (time.monotonic(), prompt tokens) per dispatch
    alive: bool = True
    link_address: str | None = None
    kv_bytes_reported: int = 0  # prefill: bytes already counted in the metrics
    refreshed_s: float = 0.0  # time.monotonic() of the last heartbeat's stats
    rates: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RATE_WINDOW))  # prefill tokens/s
    draining: bool = False  # being scaled in (or flipped): takes no new request
    num_dispatched: int = 0  # requests sent here since it joined (the autoscaler's arrival rate)
    num_dispatched_tokens: int = 0  # their prompt tokens

    def refresh(self, load: dict, now_s: float | None = None, asked_s: float | None = None) -> None:
        """The stats `load`, asked for at `asked_s` (None: now). Dispatches from before that are in them;
        later ones may not be, so they stay counted."""
        self.load = load
        self.refreshed_s = time.monotonic() if now_s is None else now_s
        asked_s = self.refreshed_s if asked_s is None else asked_s
        while self.sent and self.sent[0][0] < asked_s:
            self.sent.popleft()
        rate = load.get("prefill_tokens_per_s")
        if rate:  # a heartbeat with no prefill keeps the last rates
            self.rates.append(rate)

    @property
    def prefill_rate(self) -> float | None:
        """Prompt tokens/s this instance prefills a queue at: the median of its recent heartbeats' rates
        (None until one was measured)."""
        return statistics.median(self.rates) if self.rates else None

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens waiting here: the last heartbeat's queue and what was dispatched since."""
        return self.load.get("num_queued_prefill_tokens", 0) + self.dispatched_tokens

    def estimated_wait_s(self, now_s: float | None = None) -> float | None:
        """How long a prompt sent now would wait here before its prefill starts: the prompt tokens queued
        ahead of it at the measured prefill rate (None until a prefill was measured). The queue is the
        last heartbeat's plus what was dispatched since, less what the instance has prefilled since at
        that rate: counting every dispatched token until the next heartbeat made a CPU cluster that
        kept up at 40 req/s refuse half of its requests."""
        if not self.prefill_rate:
            return None
        elapsed_s = max(0.0, (time.monotonic() if now_s is None else now_s) - self.refreshed_s)
        return max(0.0, self.queued_prefill_tokens() / self.prefill_rate - elapsed_s)

    def snapshot(self, keys: tuple[str, ...]) -> dict:
        """What admission and placement see of this instance (for /health): `keys` of its last heartbeat's
        stats, its smoothed prefill rate and its estimated queue wait."""
        return {"role": self.role.value, "alive": self.alive, **{k: self.load.get(k) for k in keys},
                "prefill_rate": self.prefill_rate, "estimated_wait_s": self.estimated_wait_s()}

    def dispatched(self, num_prompt_tokens: int, now_s: float | None = None) -> None:
        """A request was sent here: counted in its load until a heartbeat asked for later stats."""
        self.sent.append((time.monotonic() if now_s is None else now_s, num_prompt_tokens))
        self.num_dispatched += 1
        self.num_dispatched_tokens += num_prompt_tokens

    @property
    def dispatched_tokens(self) -> int:
        """Prompt tokens sent here that the last heartbeat's stats may not include."""
        return sum(tokens for _, tokens in self.sent)

    @property
    def dispatched_requests(self) -> int:
        return len(self.sent)


class Router:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.cycles: dict[Role, itertools.count] = {}

    def pick_prefill(self, candidates: list[InstanceView], prefix_hits: dict[str, int], num_tokens: int) -> InstanceView:
        live = [v for v in candidates if v.alive]
        if not live:
            raise LookupError("no live prefill instance")
        if self.config.policy == "round_robin":
            return self._next(Role.PREFILL, live)

        def cost(v: InstanceView) -> float:
            queued = v.queued_prefill_tokens()
            hit_tokens = prefix_hits.get(v.instance_id, 0) * v.block_size
            return queued - self.config.prefix_weight_tokens * min(hit_tokens, num_tokens)

        return min(live, key=lambda v: (cost(v), v.instance_id))

    def rank_decode(self, candidates: list[InstanceView], num_tokens: int) -> list[InstanceView]:
        """Decode instances to try, best first (the first that reserves blocks wins)."""
        live = [v for v in candidates if v.alive]
        if self.config.policy == "round_robin":
            first = self._next(Role.DECODE, live) if live else None
            return sorted(live, key=lambda v: v is not first)

        def key(v: InstanceView):
            free = v.load.get("num_free_blocks", v.num_blocks) - v.dispatched_tokens // max(1, v.block_size)
            running = v.load.get("num_running", 0) + v.dispatched_requests
            return (-free, running, v.instance_id)

        return sorted(live, key=key)

    def pick_mixed(self, candidates: list[InstanceView], prefix_hits: dict[str, int], num_tokens: int) -> InstanceView:
        return self.pick_prefill(candidates, prefix_hits, num_tokens)

    def _next(self, role: Role, live: list[InstanceView]) -> InstanceView:
        counter = self.cycles.setdefault(role, itertools.count())
        return sorted(live, key=lambda v: v.instance_id)[next(counter) % len(live)]
