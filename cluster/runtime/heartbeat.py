"""The cluster's heartbeat: every `router.heartbeat_s`, each live instance's load and prefix
blocks are read, the store's registry and prefix index refreshed, the metrics exported; an
instance that does not answer within its TTL is declared dead (ClusterClient.instance_died).
"""
from __future__ import annotations

import asyncio
import logging
import time

from cluster.disagg.router import InstanceView
from cluster.store.base import InstanceLoad
from cluster.types import Role

log = logging.getLogger(__name__)
MAX_PREFIX_BLOCKS = 4096  # an instance's newest cached blocks published to the prefix index per beat


class Heartbeat:
    def __init__(self, client):
        self.client = client  # ClusterClient

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. the store is unreachable: keep serving, try again next beat
                log.exception("heartbeat")
            await asyncio.sleep(self.client.config.router.heartbeat_s)

    async def beat(self) -> None:
        """Refresh every live instance's load, the store's registry and prefix index, the metrics."""
        client = self.client
        ttl_s = client.config.router.instance_ttl_s
        for view in [v for v in client.instances.values() if v.alive]:
            asked_s = time.monotonic()  # dispatches from now on may miss these stats: they stay counted
            try:
                stats = await asyncio.wait_for(view.handle.stats.remote(), ttl_s)
                hashes = await view.handle.prefix_hashes.remote()
            except Exception as exc:
                await client.instance_died(view, f"heartbeat failed: {type(exc).__name__}: {exc}")
                continue
            view.refresh(stats, asked_s=asked_s)
            load = InstanceLoad(stats["num_running"], stats["num_waiting"], stats["num_queued_prefill_tokens"],
                                stats["num_free_blocks"], min(1.0, stats["kv_usage"]), time.time())
            client.store.heartbeat(view.instance_id, load, ttl_s)
            if hashes:
                client.store.add_prefix_blocks(view.instance_id, hashes[-MAX_PREFIX_BLOCKS:])
            self.export(view, stats)
        if client.metrics is not None:
            for role in Role:
                client.metrics.set_pool_size(role.value, len(client.pool(role)), model=client.info().name)

    def export(self, view: InstanceView, stats: dict) -> None:
        metrics = self.client.metrics
        if metrics is None:
            return
        model, pool = self.client.info().name, view.role.value
        metrics.set_engine_stats(pool, view.instance_id, stats, model=model)
        sent = stats.get("kv_bytes_sent", 0)
        if sent > view.kv_bytes_reported:
            metrics.kv_transfer_bytes.labels(model, pool, view.instance_id).inc(sent - view.kv_bytes_reported)
            view.kv_bytes_reported = sent
        for seconds in stats.get("transfer_latencies_s", []):
            metrics.kv_transfer_latency.labels(model, pool, view.instance_id).observe(seconds)
        for seconds in stats.get("queue_times_s", []):
            metrics.observe_queue_time(pool, view.instance_id, seconds, model=model)
