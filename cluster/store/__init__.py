"""Cluster state: instance registry, prefix index and request journal (see `base`).

`make_store(redis_url)` picks the backend by URL:
  1. None, "" or "memory://" -> `MemoryStore` (one process: the embedded default);
  2. "redis://host:port/db" (or "rediss://" for TLS) -> `RedisStore`, shared by
     every process of the cluster; `redis` is imported only then. With
     `retry_interval_s` it comes behind a `GuardedStore` (guarded.py): a Redis that
     goes away costs serving nothing, and is tried again every that many seconds.
"""
from __future__ import annotations

from cluster.store.base import (
    DEFAULT_JOURNAL_TTL_S,
    DEFAULT_NAMESPACE,
    DEFAULT_PREFIX_TTL_S,
    ClusterStore,
    InstanceInfo,
    InstanceLoad,
    JournalEntry,
    JournalState,
    StoreUnavailable,
)
from cluster.store.guarded import GuardedStore
from cluster.store.memory import MemoryStore

__all__ = [
    "ClusterStore",
    "GuardedStore",
    "InstanceInfo",
    "InstanceLoad",
    "JournalEntry",
    "JournalState",
    "MemoryStore",
    "StoreUnavailable",
    "make_store",
]


def make_store(
    url: str | None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    prefix_ttl_s: float = DEFAULT_PREFIX_TTL_S,
    journal_ttl_s: float = DEFAULT_JOURNAL_TTL_S,
    timeout_s: float = 1.0,
    retry_interval_s: float | None = None,
) -> ClusterStore:
    """The store `url` names; `namespace`, `timeout_s` and `retry_interval_s` apply to Redis only."""
    if url is None or url in ("", "memory://"):
        return MemoryStore(prefix_ttl_s=prefix_ttl_s, journal_ttl_s=journal_ttl_s)
    if isinstance(url, str) and url.startswith(("redis://", "rediss://")):
        from cluster.store.redis import RedisStore

        store = RedisStore(url, namespace=namespace, prefix_ttl_s=prefix_ttl_s,
                           journal_ttl_s=journal_ttl_s, timeout_s=timeout_s)
        return store if retry_interval_s is None else GuardedStore(store, retry_interval_s)
    raise ValueError(f"redis_url={url!r} must be None, 'memory://' or 'redis://host:port/db'")
