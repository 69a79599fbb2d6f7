"""Redis `ClusterStore`: shared by every process of a cluster (router, controller, instances).

Keys, all under the namespace (default `llm_cluster:`), all values JSON text:

    instance:<instance_id>   string  InstanceInfo        TTL: register / heartbeat ttl_s
    load:<instance_id>       string  InstanceLoad        TTL: heartbeat ttl_s
    instances                set     instance ids        no TTL; dead ids pruned by list_instances
    prefix:<block hash>      set     instance ids        TTL: prefix_ttl_s, refreshed on add
    blocks:<instance_id>     set     block hashes        TTL: prefix_ttl_s, refreshed on add
    journal:<request_id>     string  JournalEntry        TTL: journal_ttl_s, refreshed on start/update
    journal_on:<instance_id> set     request ids         TTL: journal_ttl_s, refreshed with its entries

Round trips per call:
  1. one per call for the registry and the prefix index: multi-key writes go in
     one MULTI/EXEC pipeline; heartbeat, list_instances, deregister_instance
     and match_prefix are Lua scripts (atomic, and match_prefix stops at the
     chain's end server-side instead of fetching every hash's set);
  2. journal writes are WATCH/MULTI transactions (read, merge, write; retried
     if another process changed the entry in between); journal_on_instance
     takes two (the index set, then MGET of the entries).

Connection and socket timeouts are `timeout_s`, with one immediate retry, so a
call against an unreachable Redis raises `StoreUnavailable` within about
2 x `timeout_s`, never hangs. Scripts touch keys they build from ARGV: fine on
a single Redis (and its replicas), not on Redis Cluster.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster.store.base import (
    DEFAULT_JOURNAL_TTL_S,
    DEFAULT_NAMESPACE,
    DEFAULT_PREFIX_TTL_S,
    ClusterStore,
    InstanceInfo,
    InstanceLoad,
    JournalEntry,
    StoreUnavailable,
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

# KEYS: info, load. ARGV: load JSON, ttl ms. -> 1, or 0 if not registered.
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: instances set. ARGV: info key prefix, load key prefix. -> [info, load or '', ...]
_LIST = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('GET', ARGV[1] .. id)
  if info then
    out[#out + 1] = info
    out[#out + 1] = redis.call('GET', ARGV[2] .. id) or ''
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"""

# KEYS: info, load, instances set, blocks set. ARGV: instance id, prefix key prefix.
_DEREGISTER = """
for _, h in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('SREM', ARGV[2] .. h, ARGV[1])
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: prefix sets in chain order. ARGV: info key prefix. -> [instance id, num leading hits, ...]
# Only registered instances count; an instance leaves `alive` at its first miss.
_MATCH = """
local alive, depth = {}, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 1 then alive[#alive + 1] = id; depth[id] = 1 end
end
for i = 2, #KEYS do
  if #alive == 0 then break end
  local still = {}
  for _, id in ipairs(alive) do
    if redis.call('SISMEMBER', KEYS[i], id) == 1 then still[#still + 1] = id; depth[id] = i end
  end
  alive = still
end
local out = {}
for id, n in pairs(depth) do out[#out + 1] = id; out[#out + 1] = n end
return out
"""


def _ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


class RedisStore(ClusterStore):
    def __init__(
        self,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        prefix_ttl_s: float = DEFAULT_PREFIX_TTL_S,
        journal_ttl_s: float = DEFAULT_JOURNAL_TTL_S,
        timeout_s: float = 1.0,
    ) -> None:
        self._ns = check_id("namespace", namespace)
        self._prefix_ttl_ms = _ms(check_ttl(prefix_ttl_s, "prefix_ttl_s"))
        self._journal_ttl_ms = _ms(check_ttl(journal_ttl_s, "journal_ttl_s"))
        timeout_s = check_ttl(timeout_s, "timeout_s")
        try:
            self._r = redis.Redis.from_url(
                url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1),
            )
        except ValueError as e:
            raise ValueError(f"redis_url={url!r} is not a Redis URL (redis://host:port/db): {e}") from None
        kw = self._r.connection_pool.connection_kwargs
        self._where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"
        self._heartbeat = self._r.register_script(_HEARTBEAT)
        self._list = self._r.register_script(_LIST)
        self._deregister = self._r.register_script(_DEREGISTER)
        self._match = self._r.register_script(_MATCH)

    @contextlib.contextmanager
    def _reach(self, op: str) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise StoreUnavailable(f"Redis at {self._where} is unavailable ({op}): {e}") from e
        except redis.exceptions.InvalidResponse as e:  # something else listens there
            raise StoreUnavailable(f"{self._where} does not speak the Redis protocol ({op}): {e}") from e

    def _key(self, kind: str, name: object = None) -> str:
        return f"{self._ns}{kind}" if name is None else f"{self._ns}{kind}:{name}"

    def close(self) -> None:
        self._r.close()

    # -- instance registry -------------------------------------------------
    def register_instance(self, info: InstanceInfo, ttl_s: float) -> None:
        if not isinstance(info, InstanceInfo):
            raise ValueError(f"info={info!r} must be an InstanceInfo")
        ttl_ms = _ms(check_ttl(ttl_s))
        iid = info.instance_id
        with self._reach("register_instance"):
            pipe = self._r.pipeline(transaction=True)
            pipe.set(self._key("instance", iid), encode(info), px=ttl_ms)
            pipe.delete(self._key("load", iid))
            pipe.sadd(self._key("instances"), iid)
            pipe.execute()

    def heartbeat(self, instance_id: str, load: InstanceLoad, ttl_s: float) -> bool:
        check_id("instance_id", instance_id)
        if not isinstance(load, InstanceLoad):
            raise ValueError(f"load={load!r} must be an InstanceLoad")
        ttl_ms = _ms(check_ttl(ttl_s))
        keys = [self._key("instance", instance_id), self._key("load", instance_id)]
        with self._reach("heartbeat"):
            return bool(self._heartbeat(keys=keys, args=[encode(load), ttl_ms]))

    def list_instances(self, pool: Role | str | None = None) -> list[tuple[InstanceInfo, InstanceLoad | None]]:
        role = None if pool is None else check_pool(pool)
        with self._reach("list_instances"):
            flat = self._list(keys=[self._key("instances")], args=[self._key("instance", ""), self._key("load", "")])
        rows = [(decode_info(info), decode_load(load) if load else None) for info, load in zip(flat[::2], flat[1::2])]
        rows.sort(key=lambda row: row[0].instance_id)
        return [row for row in rows if role is None or row[0].pool is role]

    def deregister_instance(self, instance_id: str) -> None:
        check_id("instance_id", instance_id)
        keys = [self._key(kind, instance_id) for kind in ("instance", "load")]
        keys += [self._key("instances"), self._key("blocks", instance_id)]
        with self._reach("deregister_instance"):
            self._deregister(keys=keys, args=[instance_id, self._key("prefix", "")])

    # -- prefix index ------------------------------------------------------
    def add_prefix_blocks(self, instance_id: str, hashes: list[int]) -> None:
        check_id("instance_id", instance_id)
        hashes = check_hashes(hashes)
        if not hashes:
            return
        pipe = self._r.pipeline(transaction=True)
        for h in hashes:
            pipe.sadd(self._key("prefix", h), instance_id)
            pipe.pexpire(self._key("prefix", h), self._prefix_ttl_ms)
        pipe.sadd(self._key("blocks", instance_id), *hashes)
        pipe.pexpire(self._key("blocks", instance_id), self._prefix_ttl_ms)
        with self._reach("add_prefix_blocks"):
            pipe.execute()

    def remove_prefix_blocks(self, instance_id: str, hashes: list[int]) -> None:
        check_id("instance_id", instance_id)
        hashes = check_hashes(hashes)
        if not hashes:
            return
        pipe = self._r.pipeline(transaction=True)
        for h in hashes:
            pipe.srem(self._key("prefix", h), instance_id)
        pipe.srem(self._key("blocks", instance_id), *hashes)
        with self._reach("remove_prefix_blocks"):
            pipe.execute()

    def match_prefix(self, hashes: list[int]) -> dict[str, int]:
        hashes = check_hashes(hashes)
        if not hashes:
            return {}
        with self._reach("match_prefix"):
            flat = self._match(keys=[self._key("prefix", h) for h in hashes], args=[self._key("instance", "")])
        return {iid: int(n) for iid, n in zip(flat[::2], flat[1::2])}

    # -- request journal ---------------------------------------------------
    def _index_entry(self, pipe: redis.client.Pipeline, entry: JournalEntry) -> None:
        for iid in entry.instance_ids:
            pipe.sadd(self._key("journal_on", iid), entry.request_id)
            pipe.pexpire(self._key("journal_on", iid), self._journal_ttl_ms)

    def journal_start(self, request_id: str, entry: JournalEntry) -> None:
        check_id("request_id", request_id)
        if not isinstance(entry, JournalEntry) or entry.request_id != request_id:
            raise ValueError(f"entry={entry!r} must be a JournalEntry with request_id={request_id!r}")
        key, raw = self._key("journal", request_id), encode(entry)

        def txn(pipe: redis.client.Pipeline) -> None:
            if pipe.exists(key):
                raise ValueError(f"request_id={request_id!r} is already in the journal")
            pipe.multi()
            pipe.set(key, raw, px=self._journal_ttl_ms)
            self._index_entry(pipe, entry)

        with self._reach("journal_start"):
            self._r.transaction(txn, key)

    def journal_update(self, request_id: str, /, **fields: object) -> JournalEntry | None:
        check_id("request_id", request_id)
        check_update_fields(fields)
        key = self._key("journal", request_id)

        def txn(pipe: redis.client.Pipeline) -> JournalEntry | None:
            raw = pipe.get(key)
            if raw is None:
                return None
            old = decode_entry(raw)
            new = updated_entry(old, fields)
            pipe.multi()
            pipe.set(key, encode(new), px=self._journal_ttl_ms)
            for iid in old.instance_ids - new.instance_ids:
                pipe.srem(self._key("journal_on", iid), request_id)
            self._index_entry(pipe, new)
            return new

        with self._reach("journal_update"):
            return self._r.transaction(txn, key, value_from_callable=True)

    def journal_finish(self, request_id: str) -> bool:
        check_id("request_id", request_id)
        key = self._key("journal", request_id)

        def txn(pipe: redis.client.Pipeline) -> bool:
            raw = pipe.get(key)
            if raw is None:
                return False
            pipe.multi()
            pipe.delete(key)
            for iid in decode_entry(raw).instance_ids:
                pipe.srem(self._key("journal_on", iid), request_id)
            return True

        with self._reach("journal_finish"):
            return self._r.transaction(txn, key, value_from_callable=True)

    def journal_on_instance(self, instance_id: str) -> list[JournalEntry]:
        check_id("instance_id", instance_id)
        with self._reach("journal_on_instance"):
            request_ids = sorted(self._r.smembers(self._key("journal_on", instance_id)))
            raws = self._r.mget([self._key("journal", rid) for rid in request_ids]) if request_ids else []
        entries = (decode_entry(raw) for raw in raws if raw is not None)
        # The index may lag an entry that expired or moved: the entry itself decides.
        return [e for e in entries if instance_id in e.instance_ids]

    def journal_get(self, request_id: str) -> JournalEntry | None:
        check_id("request_id", request_id)
        with self._reach("journal_get"):
            raw = self._r.get(self._key("journal", request_id))
        return None if raw is None else decode_entry(raw)
