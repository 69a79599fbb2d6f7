"""`GuardedStore`: a store that may go away (Redis restarted, or out of reach for a while) behind a
breaker, so that serving never waits on it.

  (1) every call goes to the backend, whose own timeouts bound it (RedisStore: `timeout_s`, one retry);
  (2) a call that finds the backend unreachable (`StoreUnavailable`) opens the breaker: for
      `retry_interval_s` every call fails at once with `StoreUnavailable`, touching no socket, so a
      request placed meanwhile pays nothing for the outage;
  (3) after that the next call tries the backend again: a failure keeps the breaker open another
      interval, a success closes it and bumps `generation` (the store is back, perhaps empty);
  (4) the heartbeat (runtime/heartbeat.py) keeps calling it every beat: an instance whose entry the
      store no longer has (a Redis that restarted empty, or entries that expired while it was away) is
      registered again, and the prefix index is rebuilt from the blocks each instance holds, which
      every beat publishes anyway.

What an outage costs (docs/architecture.md): prefix hints (the router places by load alone until the
index is rebuilt, one beat after the store is back), the journal entries of requests that ran
meanwhile, and other processes' view of the registry. Not requests: the router holds every leg in
memory, and a leg's retry never reads the store.

Thread-safe: the heartbeat calls it from a worker thread while the router calls it on the event loop.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cluster.store.base import ClusterStore, StoreUnavailable

log = logging.getLogger(__name__)


class GuardedStore(ClusterStore):
    def __init__(self, backend: ClusterStore, retry_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self.retry_interval_s = retry_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None  # when the breaker opened; None: closed
        self._retry_at = 0.0
        self.generation = 0  # bumped each time the store comes back
        self.num_outages = 0

    @property
    def available(self) -> bool:
        return self._down_since is None

    def status(self) -> str:
        down = self._down_since
        return "ok" if down is None else f"unavailable for {self._clock() - down:.1f} s"

    def _call(self, op: str, *args, **kwargs):
        now = self._clock()
        with self._lock:
            if self._down_since is not None and now < self._retry_at:
                raise StoreUnavailable(f"the state store has been unavailable for {now - self._down_since:.1f} s "
                                       f"(tried again every {self.retry_interval_s} s)")
        try:
            result = getattr(self.backend, op)(*args, **kwargs)
        except StoreUnavailable as exc:
            with self._lock:
                if self._down_since is None:
                    self._down_since = now
                    self.num_outages += 1
                    log.warning("state store unavailable (%s); serving goes on without it", exc)
                self._retry_at = self._clock() + self.retry_interval_s
            raise
        if self._down_since is not None:
            with self._lock:
                if self._down_since is not None:
                    log.warning("state store back after %.1f s", self._clock() - self._down_since)
                    self._down_since = None
                    self.generation += 1
        return result

    # -- ClusterStore, each through the breaker --------------------------------------------------
    def register_instance(self, info, ttl_s):
        return self._call("register_instance", info, ttl_s)

    def heartbeat(self, instance_id, load, ttl_s):
        return self._call("heartbeat", instance_id, load, ttl_s)

    def list_instances(self, pool=None):
        return self._call("list_instances", pool)

    def deregister_instance(self, instance_id):
        return self._call("deregister_instance", instance_id)

    def add_prefix_blocks(self, instance_id, hashes):
        return self._call("add_prefix_blocks", instance_id, hashes)

    def remove_prefix_blocks(self, instance_id, hashes):
        return self._call("remove_prefix_blocks", instance_id, hashes)

    def match_prefix(self, hashes):
        return self._call("match_prefix", hashes)

    def journal_start(self, request_id, entry):
        return self._call("journal_start", request_id, entry)

    def journal_update(self, request_id, /, **fields):
        return self._call("journal_update", request_id, **fields)

    def journal_finish(self, request_id):
        return self._call("journal_finish", request_id)

    def journal_on_instance(self, instance_id):
        return self._call("journal_on_instance", instance_id)

    def journal_get(self, request_id):
        return self._call("journal_get", request_id)

    def close(self) -> None:
        self.backend.close()
