"""The cluster's heartbeat: every `router.heartbeat_s`, each live instance's load and prefix
blocks are read, the store's registry and prefix index refreshed, the metrics exported; an
instance that does not answer within its TTL is declared dead (`ClusterEvents.instance_died`).
It takes the pools, the store, the metrics and the router's config, not the client.
"""
from __future__ import annotations

import asyncio
import logging
import time

from cluster.config import RouterConfig
from cluster.disagg.router import InstanceView
from cluster.runtime.pools import ClusterEvents, Pools
from cluster.store.base import InstanceLoad
from cluster.types import Role

log = logging.getLogger(__name__)
MAX_PREFIX_BLOCKS = 4096  # an instance's newest cached blocks published to the prefix index per beat


class Heartbeat:
    def __init__(self, pools: Pools, store, metrics, model: str, config: RouterConfig, events: ClusterEvents):
        self.pools = pools
        self.store = store
        self.metrics = metrics  # None: no metrics
        self.model = model
        self.config = config
        self.events = events

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. the store is unreachable: keep serving, try again next beat
                log.exception("heartbeat")
            await asyncio.sleep(self.config.heartbeat_s)

    async def beat(self) -> None:
        """Refresh every live instance's load, the store's registry and prefix index, the metrics."""
        ttl_s = self.config.instance_ttl_s
        for view in self.pools.live():
            asked_s = time.monotonic()  # dispatches from now on may miss these stats: they stay counted
            try:
                stats = await asyncio.wait_for(view.handle.stats.remote(), ttl_s)
                hashes = await view.handle.prefix_hashes.remote()
            except Exception as exc:
                await self.events.instance_died(view, f"heartbeat failed: {type(exc).__name__}: {exc}")
                continue
            view.refresh(stats, asked_s=asked_s)
            load = InstanceLoad(stats["num_running"], stats["num_waiting"], stats["num_queued_prefill_tokens"],
                                stats["num_free_blocks"], min(1.0, stats["kv_usage"]), time.time())
            self.store.heartbeat(view.instance_id, load, ttl_s)
            if hashes:
                self.store.add_prefix_blocks(view.instance_id, hashes[-MAX_PREFIX_BLOCKS:])
            self.export(view, stats)
        if self.metrics is not None:
            for role in Role:
                self.metrics.set_pool_size(role.value, len(self.pools.pool(role)), model=self.model)

    def export(self, view: InstanceView, stats: dict) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        model, pool = self.model, view.role.value
        metrics.set_engine_stats(pool, view.instance_id, stats, model=model)
        sent = stats.get("kv_bytes_sent", 0)
        if sent > view.kv_bytes_reported:
            metrics.kv_transfer_bytes.labels(model, pool, view.instance_id).inc(sent - view.kv_bytes_reported)
            view.kv_bytes_reported = sent
        for seconds in stats.get("transfer_latencies_s", []):
            metrics.kv_transfer_latency.labels(model, pool, view.instance_id).observe(seconds)
        for seconds in stats.get("queue_times_s", []):
            metrics.observe_queue_time(pool, view.instance_id, seconds, model=model)
