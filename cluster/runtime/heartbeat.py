"""The cluster's heartbeat: every `router.heartbeat_s`,
  (1) every live instance's load and prefix blocks are read, all at once (one instance on a lost node
      must not delay finding the others); an instance whose stats do not come within its TTL is pinged
      (bounded by the TTL too): no answer, or a call that raised (Ray's `RayActorError`), declares it
      dead (`ClusterEvents.instance_died`); a slow one that answers the ping is skipped this beat. Then
      each view is refreshed and its metrics exported;
  (2) then, off the event loop (a worker thread: a slow store never holds up a stream), the store's
      registry and prefix index are refreshed: an instance the store no longer knows (it expired while
      the store was away, or Redis restarted empty) is registered again, and every beat publishes the
      blocks each instance holds, so the prefix index rebuilds itself one beat after the store is back.
      A store that cannot be reached skips the rest of (2) this beat; serving goes on (store/guarded.py).
It takes the pools, the store, the metrics and the router's config, not the client.
"""
from __future__ import annotations

import asyncio
import logging
import time

from cluster.config import RouterConfig
from cluster.disagg.router import InstanceView
from cluster.runtime.pools import ClusterEvents, Pools, answers
from cluster.store.base import InstanceInfo, InstanceLoad, StoreUnavailable
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
            except Exception:  # a bug in one beat must not end the heartbeat: try again next beat
                log.exception("heartbeat")
            await asyncio.sleep(self.config.heartbeat_s)

    async def beat(self) -> None:
        """(1) every live instance's load, then (2) the store, then the pool sizes."""
        ttl_s = self.config.instance_ttl_s
        views = self.pools.live()
        answered = await asyncio.gather(*(self.probe(view, ttl_s) for view in views))
        rows: list[tuple[InstanceView, InstanceLoad, list[int]]] = []
        for view, answer in zip(views, answered):
            if isinstance(answer, str):
                await self.events.instance_died(view, answer)
                continue
            if answer is None or not view.alive:
                continue
            stats, hashes, asked_s = answer
            view.refresh(stats, asked_s=asked_s)
            load = InstanceLoad(stats["num_running"], stats["num_waiting"], stats["num_queued_prefill_tokens"],
                                stats["num_free_blocks"], min(1.0, stats["kv_usage"]), time.time())
            rows.append((view, load, hashes[-MAX_PREFIX_BLOCKS:]))
            self.export(view, stats)
        await asyncio.to_thread(self.publish, rows, ttl_s)
        if self.metrics is not None:
            for role in Role:
                self.metrics.set_pool_size(role.value, len(self.pools.pool(role)), model=self.model)

    async def probe(self, view: InstanceView, ttl_s: float):
        """(stats, prefix hashes, when they were asked for); None: slow but alive (it answered a ping);
        a string: why the instance is dead."""
        asked_s = time.monotonic()  # dispatches from now on may miss these stats: they stay counted
        try:
            stats = await asyncio.wait_for(view.handle.stats.remote(), ttl_s)
            hashes = await asyncio.wait_for(view.handle.prefix_hashes.remote(), ttl_s)
            return stats, hashes, asked_s
        except asyncio.TimeoutError:
            if await answers(view, ttl_s):
                log.warning("%s answered no stats within %.1f s but answers a ping: alive", view.instance_id, ttl_s)
                return None
            return f"heartbeat failed: no stats and no ping answered within {ttl_s:.1f} s each"
        except Exception as exc:
            return f"heartbeat failed: {type(exc).__name__}: {exc}"

    def publish(self, rows: list[tuple[InstanceView, InstanceLoad, list[int]]], ttl_s: float) -> None:
        """(2), on a worker thread: each instance's load and blocks, registering it again where the store lost it."""
        for view, load, hashes in rows:
            try:
                if not self.store.heartbeat(view.instance_id, load, ttl_s) and view.alive:
                    self.store.register_instance(instance_info(view), ttl_s)
                    self.store.heartbeat(view.instance_id, load, ttl_s)
                if hashes:
                    self.store.add_prefix_blocks(view.instance_id, hashes)
            except StoreUnavailable:
                return  # the next beat tries again
            except Exception:  # noqa: BLE001 - one instance's entry must not stop the others'
                log.exception("publishing %s to the state store", view.instance_id)

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


def instance_info(view: InstanceView) -> InstanceInfo:
    """What the store's registry says of an instance (at its join, and again whenever the store lost it)."""
    return InstanceInfo(view.instance_id, view.role, view.link_address or view.instance_id,
                        num_blocks=view.num_blocks, block_size=view.block_size, started_at=time.time())
