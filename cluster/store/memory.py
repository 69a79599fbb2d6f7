"""In-memory `ClusterStore`: the embedded default and the reference the Redis backend is tested against.

It mirrors the Redis layout key for key, so both behave identically:
  1. every value is kept as the same JSON text the Redis backend writes
     (callers never share a mutable object with the store);
  2. TTLs are per key, as in Redis: a prefix entry (block hash -> instance ids)
     lives `prefix_ttl_s` after the last add to it, whoever added;
  3. expired keys vanish on access, and a sweep drops the rest every few
     seconds so memory does not grow with dead entries.

One process only (the store lives in the object); a lock makes it safe to use
from several threads.
"""
from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

from cluster.store.base import (
    DEFAULT_JOURNAL_TTL_S,
    DEFAULT_PREFIX_TTL_S,
    ClusterStore,
    InstanceInfo,
    InstanceLoad,
    JournalEntry,
    check_hashes,
    check_id,
    check_pool,
    check_ttl,
    check_update_fields,
    decode_entry,
    decode_info,
    decode_load,
    encode,
    updated_entry,
)
from cluster.types import Role

K = TypeVar("K")
V = TypeVar("V")
_SWEEP_INTERVAL_S = 5.0


class _ExpiringMap(Generic[K, V]):
    """Keys with a deadline (monotonic seconds), like Redis keys with a TTL."""

    def __init__(self) -> None:
        self._items: dict[K, tuple[V, float]] = {}

    def get(self, key: K, now: float) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._items[key]
            return None
        return item[0]

    def set(self, key: K, value: V, expires_at: float) -> None:
        self._items[key] = (value, expires_at)

    def touch(self, key: K, expires_at: float) -> None:
        self._items[key] = (self._items[key][0], expires_at)

    def pop(self, key: K, now: float) -> V | None:
        item = self._items.pop(key, None)
        return item[0] if item is not None and item[1] > now else None

    def live_items(self, now: float) -> list[tuple[K, V]]:
        return [(key, value) for key, (value, deadline) in self._items.items() if deadline > now]

    def sweep(self, now: float) -> None:
        self._items = {key: item for key, item in self._items.items() if item[1] > now}


class MemoryStore(ClusterStore):
    def __init__(self, *, prefix_ttl_s: float = DEFAULT_PREFIX_TTL_S, journal_ttl_s: float = DEFAULT_JOURNAL_TTL_S) -> None:
        self._prefix_ttl_s = check_ttl(prefix_ttl_s, "prefix_ttl_s")
        self._journal_ttl_s = check_ttl(journal_ttl_s, "journal_ttl_s")
        self._lock = threading.Lock()
        self._info: _ExpiringMap[str, str] = _ExpiringMap()  # instance id -> InstanceInfo JSON
        self._load: _ExpiringMap[str, str] = _ExpiringMap()  # instance id -> InstanceLoad JSON
        self._prefix: _ExpiringMap[int, set[str]] = _ExpiringMap()  # block hash -> instance ids
        self._blocks: _ExpiringMap[str, set[int]] = _ExpiringMap()  # instance id -> its block hashes
        self._journal: _ExpiringMap[str, str] = _ExpiringMap()  # request id -> JournalEntry JSON
        self._next_sweep = time.monotonic() + _SWEEP_INTERVAL_S

    def _now(self) -> float:
        """Monotonic now; sweeps expired keys every few seconds (call with the lock held)."""
        now = time.monotonic()
        if now >= self._next_sweep:
            for keys in (self._info, self._load, self._prefix, self._blocks, self._journal):
                keys.sweep(now)
            self._next_sweep = now + _SWEEP_INTERVAL_S
        return now

    # -- instance registry -------------------------------------------------
    def register_instance(self, info: InstanceInfo, ttl_s: float) -> None:
        if not isinstance(info, InstanceInfo):
            raise ValueError(f"info={info!r} must be an InstanceInfo")
        ttl_s = check_ttl(ttl_s)
        with self._lock:
            now = self._now()
            self._info.set(info.instance_id, encode(info), now + ttl_s)
            self._load.pop(info.instance_id, now)

    def heartbeat(self, instance_id: str, load: InstanceLoad, ttl_s: float) -> bool:
        check_id("instance_id", instance_id)
        if not isinstance(load, InstanceLoad):
            raise ValueError(f"load={load!r} must be an InstanceLoad")
        ttl_s = check_ttl(ttl_s)
        with self._lock:
            now = self._now()
            if self._info.get(instance_id, now) is None:
                return False
            self._info.touch(instance_id, now + ttl_s)
            self._load.set(instance_id, encode(load), now + ttl_s)
            return True

    def list_instances(self, pool: Role | str | None = None) -> list[tuple[InstanceInfo, InstanceLoad | None]]:
        role = None if pool is None else check_pool(pool)
        with self._lock:
            now = self._now()
            rows = [(raw, self._load.get(iid, now)) for iid, raw in sorted(self._info.live_items(now))]
        out = [(decode_info(info), None if load is None else decode_load(load)) for info, load in rows]
        return [row for row in out if role is None or row[0].pool is role]

    def deregister_instance(self, instance_id: str) -> None:
        check_id("instance_id", instance_id)
        with self._lock:
            now = self._now()
            self._info.pop(instance_id, now)
            self._load.pop(instance_id, now)
            for h in self._blocks.pop(instance_id, now) or ():
                self._discard_holder(h, instance_id, now)

    # -- prefix index ------------------------------------------------------
    def add_prefix_blocks(self, instance_id: str, hashes: list[int]) -> None:
        check_id("instance_id", instance_id)
        hashes = check_hashes(hashes)
        if not hashes:
            return
        with self._lock:
            now = self._now()
            deadline = now + self._prefix_ttl_s
            for h in hashes:
                holders = self._prefix.get(h, now) or set()
                holders.add(instance_id)
                self._prefix.set(h, holders, deadline)
            blocks = self._blocks.get(instance_id, now) or set()
            blocks.update(hashes)
            self._blocks.set(instance_id, blocks, deadline)

    def remove_prefix_blocks(self, instance_id: str, hashes: list[int]) -> None:
        check_id("instance_id", instance_id)
        hashes = check_hashes(hashes)
        with self._lock:
            now = self._now()
            blocks = self._blocks.get(instance_id, now)
            for h in hashes:
                self._discard_holder(h, instance_id, now)
                if blocks is not None:
                    blocks.discard(h)
            if blocks is not None and not blocks:
                self._blocks.pop(instance_id, now)

    def _discard_holder(self, h: int, instance_id: str, now: float) -> None:
        holders = self._prefix.get(h, now)
        if holders is not None:
            holders.discard(instance_id)
            if not holders:  # an empty set is no key, as in Redis
                self._prefix.pop(h, now)

    def match_prefix(self, hashes: list[int]) -> dict[str, int]:
        hashes = check_hashes(hashes)
        if not hashes:
            return {}
        with self._lock:
            now = self._now()
            alive = {i for i in self._prefix.get(hashes[0], now) or () if self._info.get(i, now) is not None}
            depth = dict.fromkeys(alive, 1)
            for n, h in enumerate(hashes[1:], start=2):
                if not alive:
                    break
                alive &= self._prefix.get(h, now) or set()
                depth.update(dict.fromkeys(alive, n))
        return depth

    # -- request journal ---------------------------------------------------
    def journal_start(self, request_id: str, entry: JournalEntry) -> None:
        check_id("request_id", request_id)
        if not isinstance(entry, JournalEntry) or entry.request_id != request_id:
            raise ValueError(f"entry={entry!r} must be a JournalEntry with request_id={request_id!r}")
        raw = encode(entry)
        with self._lock:
            now = self._now()
            if self._journal.get(request_id, now) is not None:
                raise ValueError(f"request_id={request_id!r} is already in the journal")
            self._journal.set(request_id, raw, now + self._journal_ttl_s)

    def journal_update(self, request_id: str, /, **fields: object) -> JournalEntry | None:
        check_id("request_id", request_id)
        check_update_fields(fields)
        with self._lock:
            now = self._now()
            raw = self._journal.get(request_id, now)
            if raw is None:
                return None
            entry = updated_entry(decode_entry(raw), fields)
            self._journal.set(request_id, encode(entry), now + self._journal_ttl_s)
        return entry

    def journal_finish(self, request_id: str) -> bool:
        check_id("request_id", request_id)
        with self._lock:
            return self._journal.pop(request_id, self._now()) is not None

    def journal_on_instance(self, instance_id: str) -> list[JournalEntry]:
        check_id("instance_id", instance_id)
        with self._lock:
            rows = sorted(self._journal.live_items(self._now()))
        entries = (decode_entry(raw) for _, raw in rows)
        return [e for e in entries if instance_id in e.instance_ids]

    def journal_get(self, request_id: str) -> JournalEntry | None:
        check_id("request_id", request_id)
        with self._lock:
            raw = self._journal.get(request_id, self._now())
        return None if raw is None else decode_entry(raw)
