"""The cluster state store: one interface, an in-memory and a Redis backend.

The store is the cluster's shared memory between the controller, the router
and the instances. It never sits inside an engine's step loop: instances batch
what they publish and send it with their heartbeat.

`ClusterStore` methods, who calls each and when:

Instance registry (entries carry a TTL; an instance that stops heartbeating
disappears without anyone deregistering it):
  1. `register_instance(info, ttl_s)` -- the controller, once an instance
     actor is up (and again if a heartbeat returns False). Replaces an old
     entry of the same id and clears its load.
  2. `heartbeat(instance_id, load, ttl_s) -> bool` -- each instance, every few
     seconds, with its current load. Refreshes the TTL; returns False if the
     instance is not registered (expired): it should register again.
  3. `list_instances(pool=None)` -- the router (to pick a prefill and a decode
     instance), the autoscaler and the controller's health loop. Live entries
     only, sorted by instance id, each with its last load (None before the
     first heartbeat).
  4. `deregister_instance(instance_id)` -- the controller, when an instance is
     shut down or declared dead. Also drops its prefix-index entries.

Prefix index (block hash -> instances holding that block's KV):
  5. `add_prefix_blocks(instance_id, hashes)` -- an instance, with its
     heartbeat, for the blocks its prefix cache has newly filled (or still
     holds: re-adding refreshes the entries' TTL, `prefix_ttl_s`).
  6. `remove_prefix_blocks(instance_id, hashes)` -- an instance, for blocks it
     evicted.
  7. `match_prefix(hashes) -> {instance_id: num_blocks}` -- the router, per
     request, with the chain of block hashes of its prompt. Counts, per live
     instance, the LEADING hashes it holds (stops at its first miss):

         hashes     h0  h1  h2  h3
         inst A     x   x   .   x    -> 2   (h3 does not count: chain broken)
         inst B     .   x   x   x    -> absent (0): misses h0

Request journal (what is in flight where, so no request is silently dropped):
  8. `journal_start(request_id, entry)` -- the router, when it admits a
     request. An id already in the journal is a ValueError.
  9. `journal_update(request_id, **fields) -> entry | None` -- the router, as
     the request moves queued -> prefilling -> transferring -> decoding, or is
     moved to another instance. None if the request is not in the journal.
 10. `journal_finish(request_id) -> bool` -- the router, when the request
     completed, failed or was aborted (the client saw the outcome).
 11. `journal_on_instance(instance_id)` -- the controller, when that instance
     died: the entries whose prefill or decode instance it was, to retry.
 12. `journal_get(request_id)` -- the router and tests.
 13. `close()` -- the owner, at shutdown.
 14. `status()` -- `/health`: "ok", or how long the backend has been unreachable.

Journal entries expire `journal_ttl_s` after their last start/update, so a
crashed router leaves nothing behind for good. Every method validates its
arguments first (`ValueError`, state unchanged); a backend that cannot be
reached raises `StoreUnavailable`.
"""
from __future__ import annotations

import abc
import dataclasses
import enum
import json
import math
import re
import time
from dataclasses import dataclass

from cluster.types import Role

DEFAULT_NAMESPACE = "llm_cluster:"
DEFAULT_PREFIX_TTL_S = 600.0  # an instance re-adds the blocks it still holds at least this often
DEFAULT_JOURNAL_TTL_S = 3600.0  # an entry untouched this long is gone (its router crashed)
MAX_HASH = 2**64 - 1
_ID_RE = re.compile(r"[!-~]{1,256}")  # printable ASCII, no spaces


class StoreUnavailable(RuntimeError):
    """The store's backend (Redis) cannot be reached; the message says where and why."""


class JournalState(enum.Enum):
    """Where an in-flight request is."""

    QUEUED = "queued"  # admitted, no instance has started it
    PREFILLING = "prefilling"  # its prompt runs on `prefill_instance`
    TRANSFERRING = "transferring"  # its KV moves to `decode_instance`
    DECODING = "decoding"  # `decode_instance` (or a mixed instance) generates tokens


def _require(ok: bool, owner: str, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} {rule}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_id(name: str, value: object) -> str:
    """An instance or request id: 1-256 printable ASCII characters, no spaces."""
    if not (isinstance(value, str) and _ID_RE.fullmatch(value)):
        raise ValueError(f"{name}={value!r} must be 1-256 printable ASCII characters without spaces")
    return value


def check_ttl(ttl_s: object, name: str = "ttl_s") -> float:
    if not (_is_number(ttl_s) and ttl_s > 0):
        raise ValueError(f"{name}={ttl_s!r} must be a finite number of seconds > 0")
    return float(ttl_s)


def check_hashes(hashes: object) -> list[int]:
    """Block hashes: a list of unsigned 64-bit integers."""
    if not isinstance(hashes, (list, tuple)):
        raise ValueError(f"hashes={hashes!r} must be a list of integers")
    for h in hashes:
        if not (_is_int(h) and 0 <= h <= MAX_HASH):
            raise ValueError(f"hashes contains {h!r}; each must be an integer in [0, 2**64)")
    return list(hashes)


def check_pool(pool: object) -> Role:
    try:
        return Role(pool)
    except ValueError:
        raise ValueError(f"pool={pool!r} must be one of {[r.value for r in Role]}") from None


def _check_json(owner: str, name: str, value: object) -> None:
    """JSON values that survive a round trip unchanged (str keys, finite floats)."""
    if value is None or isinstance(value, (bool, str)) or _is_number(value):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json(owner, name, item)
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _check_json(owner, name, item)
        return
    raise ValueError(f"{owner}.{name} holds {value!r}, which is not JSON (str keys, finite numbers)")


@dataclass(frozen=True)
class InstanceInfo:
    """What an instance is; set once at registration."""

    instance_id: str
    pool: Role  # prefill | decode | mixed (a string is converted)
    address: str  # how to reach it: a Ray actor name or host:port
    tp: int = 1  # tensor-parallel ranks
    pp: int = 1  # pipeline-parallel stages
    num_blocks: int = 1  # KV blocks in its pool
    block_size: int = 16  # tokens per KV block
    started_at: float = 0.0  # unix time, seconds

    def __post_init__(self) -> None:
        check_id("InstanceInfo.instance_id", self.instance_id)
        object.__setattr__(self, "pool", check_pool(self.pool))
        _require(isinstance(self.address, str) and self.address != "", "InstanceInfo", "address", self.address, "must be a non-empty string")
        for name in ("tp", "pp", "num_blocks", "block_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, "InstanceInfo", name, value, "must be an integer >= 1")
        _require(_is_number(self.started_at), "InstanceInfo", "started_at", self.started_at, "must be a finite number")
        object.__setattr__(self, "started_at", float(self.started_at))


@dataclass(frozen=True)
class InstanceLoad:
    """How busy an instance is; sent with every heartbeat."""

    num_running: int = 0  # requests in its running batch
    num_waiting: int = 0  # requests queued for admission
    num_queued_prefill_tokens: int = 0  # prompt tokens not yet prefilled
    num_free_blocks: int = 0  # KV blocks free for new requests
    kv_usage: float = 0.0  # fraction of KV blocks in use, [0, 1]
    updated_at: float = 0.0  # unix time the instance measured this, seconds

    def __post_init__(self) -> None:
        for name in ("num_running", "num_waiting", "num_queued_prefill_tokens", "num_free_blocks"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, "InstanceLoad", name, value, "must be an integer >= 0")
        _require(_is_number(self.kv_usage) and 0 <= self.kv_usage <= 1, "InstanceLoad", "kv_usage", self.kv_usage, "must be in [0, 1]")
        _require(_is_number(self.updated_at), "InstanceLoad", "updated_at", self.updated_at, "must be a finite number")
        object.__setattr__(self, "kv_usage", float(self.kv_usage))
        object.__setattr__(self, "updated_at", float(self.updated_at))


@dataclass(frozen=True)
class JournalEntry:
    """One in-flight request: enough to run it again elsewhere."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: dict  # JSON-able, e.g. dataclasses.asdict(SamplingParams)
    prefill_instance: str | None = None
    decode_instance: str | None = None
    state: JournalState = JournalState.QUEUED  # a string is converted
    num_output_tokens: int = 0  # tokens already streamed to the client
    updated_at: float = 0.0  # unix time of the last change, seconds

    def __post_init__(self) -> None:
        check_id("JournalEntry.request_id", self.request_id)
        tokens = self.prompt_token_ids
        _require(isinstance(tokens, (list, tuple)) and all(_is_int(t) and t >= 0 for t in tokens),
                 "JournalEntry", "prompt_token_ids", tokens, "must be a list of integers >= 0")
        object.__setattr__(self, "prompt_token_ids", list(tokens))
        _require(isinstance(self.sampling_params, dict), "JournalEntry", "sampling_params", self.sampling_params, "must be a dict")
        _check_json("JournalEntry", "sampling_params", self.sampling_params)
        for name in ("prefill_instance", "decode_instance"):
            if getattr(self, name) is not None:
                check_id(f"JournalEntry.{name}", getattr(self, name))
        try:
            object.__setattr__(self, "state", JournalState(self.state))
        except ValueError:
            raise ValueError(f"JournalEntry.state={self.state!r} must be one of {[s.value for s in JournalState]}") from None
        _require(_is_int(self.num_output_tokens) and self.num_output_tokens >= 0, "JournalEntry", "num_output_tokens", self.num_output_tokens, "must be an integer >= 0")
        _require(_is_number(self.updated_at), "JournalEntry", "updated_at", self.updated_at, "must be a finite number")
        object.__setattr__(self, "updated_at", float(self.updated_at))

    @property
    def instance_ids(self) -> set[str]:
        return {i for i in (self.prefill_instance, self.decode_instance) if i is not None}


_UPDATABLE = frozenset(f.name for f in dataclasses.fields(JournalEntry)) - {"request_id"}


def check_update_fields(fields: dict) -> None:
    unknown = sorted(set(fields) - _UPDATABLE)
    if unknown:
        raise ValueError(f"journal_update got {unknown}; updatable fields are {sorted(_UPDATABLE)}")


def updated_entry(entry: JournalEntry, fields: dict) -> JournalEntry:
    """`entry` with `fields` replaced (validated); `updated_at` defaults to now."""
    fields = dict(fields)
    fields.setdefault("updated_at", time.time())
    return dataclasses.replace(entry, **fields)


# -- codec: the one JSON form both backends keep (no pickle) -------------------
def encode(obj: InstanceInfo | InstanceLoad | JournalEntry) -> str:
    data = dataclasses.asdict(obj)
    for key, value in data.items():
        if isinstance(value, enum.Enum):
            data[key] = value.value
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def decode_info(raw: str) -> InstanceInfo:
    return InstanceInfo(**json.loads(raw))


def decode_load(raw: str) -> InstanceLoad:
    return InstanceLoad(**json.loads(raw))


def decode_entry(raw: str) -> JournalEntry:
    return JournalEntry(**json.loads(raw))


class ClusterStore(abc.ABC):
    """Instance registry, prefix index and request journal (see the module docstring)."""

    # -- instance registry -------------------------------------------------
    @abc.abstractmethod
    def register_instance(self, info: InstanceInfo, ttl_s: float) -> None: ...

    @abc.abstractmethod
    def heartbeat(self, instance_id: str, load: InstanceLoad, ttl_s: float) -> bool: ...

    @abc.abstractmethod
    def list_instances(self, pool: Role | str | None = None) -> list[tuple[InstanceInfo, InstanceLoad | None]]: ...

    @abc.abstractmethod
    def deregister_instance(self, instance_id: str) -> None: ...

    # -- prefix index ------------------------------------------------------
    @abc.abstractmethod
    def add_prefix_blocks(self, instance_id: str, hashes: list[int]) -> None: ...

    @abc.abstractmethod
    def remove_prefix_blocks(self, instance_id: str, hashes: list[int]) -> None: ...

    @abc.abstractmethod
    def match_prefix(self, hashes: list[int]) -> dict[str, int]: ...

    # -- request journal ---------------------------------------------------
    @abc.abstractmethod
    def journal_start(self, request_id: str, entry: JournalEntry) -> None: ...

    @abc.abstractmethod
    def journal_update(self, request_id: str, /, **fields: object) -> JournalEntry | None: ...

    @abc.abstractmethod
    def journal_finish(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def journal_on_instance(self, instance_id: str) -> list[JournalEntry]: ...

    @abc.abstractmethod
    def journal_get(self, request_id: str) -> JournalEntry | None: ...

    def status(self) -> str:
        """"ok", or why the store cannot be used now (GuardedStore: how long it has been away)."""
        return "ok"

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
