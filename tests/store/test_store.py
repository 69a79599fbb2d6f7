"""Both `ClusterStore` backends, run through the same tests; Redis is a real redis-server (conftest)."""
from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.store import (
    InstanceInfo,
    InstanceLoad,
    JournalEntry,
    JournalState,
    MemoryStore,
    StoreUnavailable,
    make_store,
)
from cluster.store.redis import RedisStore
from cluster.types import Role

from .conftest import free_port

TTL_S = 0.3  # short TTLs; waits are this plus a margin
WAIT_S = TTL_S + 0.2
LONG_TTL_S = 60.0


@pytest.fixture(params=["memory", "redis"])
def make(request):
    """Makes stores of one backend; Redis ones share a fresh namespace on the session's server."""
    made = []
    if request.param == "memory":
        def factory(**kw):
            made.append(MemoryStore(**kw))
            return made[-1]
    else:
        url, namespace = request.getfixturevalue("redis_url"), f"test-{uuid.uuid4().hex}:"

        def factory(**kw):
            made.append(RedisStore(url, namespace=namespace, **kw))
            return made[-1]
    yield factory
    for s in made:
        s.close()


@pytest.fixture
def store(make):
    return make()


def info(instance_id: str, pool: Role = Role.DECODE, **kw) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, pool=pool, address=f"actor:{instance_id}", tp=2, pp=1,
                        num_blocks=128, block_size=16, started_at=1.5, **kw)


def entry(request_id: str, **kw) -> JournalEntry:
    return JournalEntry(request_id=request_id, prompt_token_ids=[1, 2, 3],
                        sampling_params={"temperature": 0.0, "stop": ["\n"], "max_tokens": 8}, **kw)


def ids(rows) -> list[str]:
    return [i.instance_id for i, _ in rows]


# -- instance registry ---------------------------------------------------------
def test_register_list_by_pool_and_load(store):
    store.register_instance(info("d1"), LONG_TTL_S)
    store.register_instance(info("p1", Role.PREFILL), LONG_TTL_S)
    store.register_instance(info("m1", "mixed"), LONG_TTL_S)
    assert ids(store.list_instances()) == ["d1", "m1", "p1"]
    assert ids(store.list_instances(Role.PREFILL)) == ["p1"]
    assert ids(store.list_instances("decode")) == ["d1"]
    assert store.list_instances()[0] == (info("d1"), None)

    load = InstanceLoad(num_running=3, num_waiting=1, num_queued_prefill_tokens=40, num_free_blocks=90,
                        kv_usage=0.296875, updated_at=12.25)
    assert store.heartbeat("d1", load, LONG_TTL_S) is True
    assert store.list_instances(Role.DECODE) == [(info("d1"), load)]
    store.register_instance(info("d1"), LONG_TTL_S)  # a restart clears the old load
    assert store.list_instances(Role.DECODE) == [(info("d1"), None)]


def test_registration_expires(store):
    store.register_instance(info("short"), TTL_S)
    store.register_instance(info("long"), LONG_TTL_S)
    time.sleep(WAIT_S)
    assert ids(store.list_instances()) == ["long"]
    assert store.heartbeat("short", InstanceLoad(), TTL_S) is False  # it must register again
    assert ids(store.list_instances()) == ["long"]


def test_heartbeat_refreshes_ttl(store):
    store.register_instance(info("a"), TTL_S)
    for n in range(4):  # 4 x 0.15 s outlives one TTL only through the heartbeats
        time.sleep(TTL_S / 2)
        assert store.heartbeat("a", InstanceLoad(num_running=n), TTL_S) is True
    assert store.list_instances()[0][1].num_running == 3
    time.sleep(WAIT_S)
    assert store.list_instances() == []


# -- prefix index --------------------------------------------------------------
def test_match_counts_leading_run_per_instance(store):
    for iid in ("A", "B", "C"):
        store.register_instance(info(iid), LONG_TTL_S)
    h = [11, 22, 33, 2**64 - 1]
    store.add_prefix_blocks("A", [h[0], h[1], h[3]])  # h2 missing: h3 does not count
    store.add_prefix_blocks("B", h[1:])  # misses h0: matches nothing
    store.add_prefix_blocks("C", h)
    assert store.match_prefix(h) == {"A": 2, "C": 4}
    assert store.match_prefix(h[:1]) == {"A": 1, "C": 1}
    assert store.match_prefix(h[1:]) == {"A": 1, "B": 3, "C": 3}
    assert store.match_prefix([99] + h) == {}
    assert store.match_prefix([]) == {}


def test_match_counts_only_registered_instances(store):
    store.register_instance(info("live"), LONG_TTL_S)
    store.register_instance(info("dying"), TTL_S)
    for iid in ("live", "dying", "never_registered"):
        store.add_prefix_blocks(iid, [1, 2])
    assert store.match_prefix([1, 2]) == {"live": 2, "dying": 2}
    time.sleep(WAIT_S)
    assert store.match_prefix([1, 2]) == {"live": 2}


def test_remove_prefix_blocks(store):
    store.register_instance(info("A"), LONG_TTL_S)
    store.add_prefix_blocks("A", [1, 2, 3])
    store.remove_prefix_blocks("A", [2, 404])  # an unknown hash is ignored
    assert store.match_prefix([1, 2, 3]) == {"A": 1}
    store.add_prefix_blocks("A", [2])
    assert store.match_prefix([1, 2, 3]) == {"A": 3}


def test_deregister_drops_instance_and_its_prefix_entries(store):
    store.register_instance(info("A"), LONG_TTL_S)
    store.register_instance(info("B"), LONG_TTL_S)
    store.add_prefix_blocks("A", [1, 2])
    store.add_prefix_blocks("B", [1])
    store.deregister_instance("A")
    store.deregister_instance("ghost")  # unknown: nothing happens
    assert ids(store.list_instances()) == ["B"]
    store.register_instance(info("A"), LONG_TTL_S)  # back, but it holds nothing now
    assert store.match_prefix([1, 2]) == {"B": 1}


def test_prefix_entries_expire_and_add_refreshes(make):
    store = make(prefix_ttl_s=TTL_S)
    store.register_instance(info("A"), LONG_TTL_S)
    store.add_prefix_blocks("A", [1])
    store.add_prefix_blocks("A", [2])
    for _ in range(3):
        time.sleep(TTL_S / 2)
        store.add_prefix_blocks("A", [1])
    assert store.match_prefix([1, 2]) == {"A": 1}  # 2 was never refreshed
    time.sleep(WAIT_S)
    assert store.match_prefix([1]) == {}


# -- request journal -----------------------------------------------------------
def test_journal_lifecycle(store):
    store.journal_start("r1", entry("r1", updated_at=1.0))
    store.journal_start("r2", entry("r2", prefill_instance="P", updated_at=1.0))
    assert store.journal_get("r1") == entry("r1", updated_at=1.0)
    with pytest.raises(ValueError, match="already in the journal"):
        store.journal_start("r1", entry("r1"))

    got = store.journal_update("r1", state=JournalState.PREFILLING, prefill_instance="P", updated_at=2.0)
    assert got == entry("r1", state="prefilling", prefill_instance="P", updated_at=2.0)
    assert store.journal_get("r1") == got
    assert [e.request_id for e in store.journal_on_instance("P")] == ["r1", "r2"]

    store.journal_update("r1", state="transferring", decode_instance="D")
    assert [e.request_id for e in store.journal_on_instance("D")] == ["r1"]
    done = store.journal_update("r1", state="decoding", prefill_instance=None, num_output_tokens=5)
    assert done.updated_at > 2.0  # defaults to now
    assert [e.request_id for e in store.journal_on_instance("P")] == ["r2"]  # r1 left P
    assert store.journal_on_instance("D") == [done]

    assert store.journal_finish("r1") is True
    assert store.journal_finish("r1") is False
    assert store.journal_get("r1") is None
    assert store.journal_update("r1", num_output_tokens=6) is None  # finished: no resurrection
    assert store.journal_get("r1") is None
    assert store.journal_on_instance("D") == []


def test_journal_update_rejects_bad_fields_and_changes_nothing(store):
    store.journal_start("r", entry("r", updated_at=1.0))
    with pytest.raises(ValueError, match="request_id"):
        store.journal_update("r", request_id="other")
    with pytest.raises(ValueError, match="nonsense"):
        store.journal_update("r", nonsense=1)
    with pytest.raises(ValueError, match="state"):
        store.journal_update("r", state="flying")
    with pytest.raises(ValueError, match="decode_instance"):
        store.journal_update("r", decode_instance="has space")
    assert store.journal_get("r") == entry("r", updated_at=1.0)


def test_journal_entries_expire(make):
    store = make(journal_ttl_s=TTL_S)
    store.journal_start("r", entry("r", decode_instance="D"))
    time.sleep(WAIT_S)
    assert store.journal_get("r") is None
    assert store.journal_on_instance("D") == []
    store.journal_start("r", entry("r"))  # the id is free again


# -- validation ------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda s: s.register_instance(info("a"), 0), "ttl_s"),
    (lambda s: s.register_instance(info("a"), float("inf")), "ttl_s"),
    (lambda s: s.register_instance({"instance_id": "a"}, 1.0), "InstanceInfo"),
    (lambda s: s.heartbeat("", InstanceLoad(), 1.0), "instance_id"),
    (lambda s: s.heartbeat("a", None, 1.0), "InstanceLoad"),
    (lambda s: s.list_instances("gpu"), "pool"),
    (lambda s: s.deregister_instance(7), "instance_id"),
    (lambda s: s.add_prefix_blocks("a", [-1]), "hashes"),
    (lambda s: s.add_prefix_blocks("a", [2**64]), "hashes"),
    (lambda s: s.add_prefix_blocks("a", [True]), "hashes"),
    (lambda s: s.remove_prefix_blocks("a", [1.0]), "hashes"),
    (lambda s: s.match_prefix(123), "hashes"),
    (lambda s: s.journal_start("r", entry("other")), "request_id"),
    (lambda s: s.journal_get("x" * 257), "request_id"),
    (lambda s: s.journal_on_instance("a\nb"), "instance_id"),
])
def test_bad_arguments_raise_value_error(store, call, match):
    with pytest.raises(ValueError, match=match):
        call(store)
    assert store.list_instances() == [] and store.match_prefix([1]) == {}


@pytest.mark.parametrize("make_bad, match", [
    (lambda: InstanceInfo("a", "gpu", "x"), "pool"),
    (lambda: InstanceInfo("a", Role.DECODE, "x", tp=0), "tp"),
    (lambda: InstanceInfo("a", Role.DECODE, ""), "address"),
    (lambda: InstanceLoad(kv_usage=1.5), "kv_usage"),
    (lambda: InstanceLoad(num_running=-1), "num_running"),
    (lambda: InstanceLoad(updated_at=float("nan")), "updated_at"),
    (lambda: JournalEntry("r", [1, -2], {}), "prompt_token_ids"),
    (lambda: JournalEntry("r", [1], {"seed": object()}), "sampling_params"),
    (lambda: JournalEntry("r", [1], {1: "int key"}), "sampling_params"),
    (lambda: JournalEntry("r", [1], {}, state="done"), "state"),
    (lambda: JournalEntry("r", [1], {}, num_output_tokens=True), "num_output_tokens"),
])
def test_bad_records_raise_value_error(make_bad, match):
    with pytest.raises(ValueError, match=match):
        make_bad()


# -- Redis specifics -------------------------------------------------------------
def test_two_redis_stores_share_state(redis_url):
    namespace = f"test-{uuid.uuid4().hex}:"
    a, b = (RedisStore(redis_url, namespace=namespace) for _ in range(2))
    other = RedisStore(redis_url, namespace=f"other-{uuid.uuid4().hex}:")
    a.register_instance(info("X"), LONG_TTL_S)
    a.add_prefix_blocks("X", [5, 6])
    b.journal_start("r", entry("r", decode_instance="X"))
    assert ids(b.list_instances()) == ["X"] and b.match_prefix([5, 6]) == {"X": 2}
    assert a.journal_on_instance("X") == [entry("r", decode_instance="X")]
    b.deregister_instance("X")
    assert a.list_instances() == [] and a.match_prefix([5]) == {}
    assert other.list_instances() == [] and other.journal_get("r") is None  # namespaces are apart
    for s in (a, b, other):
        s.close()


def test_redis_keys_are_namespaced_json(redis_url):
    import redis

    namespace = f"test-{uuid.uuid4().hex}:"
    store = make_store(redis_url, namespace=namespace)
    store.register_instance(info("X"), LONG_TTL_S)
    store.heartbeat("X", InstanceLoad(kv_usage=0.5), LONG_TTL_S)
    store.add_prefix_blocks("X", [2**64 - 1])
    store.journal_start("r", entry("r", prefill_instance="X"))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = sorted(client.scan_iter(match=f"{namespace}*"))
    assert [k.removeprefix(namespace) for k in keys] == [
        "blocks:X", "instance:X", "instances", "journal:r", "journal_on:X", "load:X", f"prefix:{2**64 - 1}"]
    for key in keys:
        if client.type(key) == "string":
            json.loads(client.get(key))
        else:
            assert 0 < client.pttl(key) or key.endswith("instances")
    client.close()
    store.close()


def test_unreachable_redis_raises_store_unavailable_quickly():
    store = make_store(f"redis://127.0.0.1:{free_port()}/0")
    for call in (lambda: store.list_instances(), lambda: store.journal_start("r", entry("r")),
                 lambda: store.add_prefix_blocks("a", [1])):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="127.0.0.1"):
            call()
        assert time.monotonic() - started < 2.0


def test_silent_server_times_out_as_store_unavailable():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = make_store(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Timeout"):
            store.match_prefix([1])
        assert time.monotonic() - started < 2 * 0.3 + 0.5  # one try, one retry


def test_make_store_picks_backend_by_url(redis_url):
    assert isinstance(make_store(None), MemoryStore)
    assert isinstance(make_store("memory://"), MemoryStore)
    assert isinstance(make_store(redis_url), RedisStore)
    for bad in ("http://localhost:6379", "memory", 6379):
        with pytest.raises(ValueError, match="redis_url"):
            make_store(bad)


# -- both backends agree -----------------------------------------------------------
INSTANCES = ["i0", "i1", "i2"]
REQUESTS = ["r0", "r1", "r2"]
HASHES = st.lists(st.sampled_from([0, 1, 2, 3, 2**64 - 1]), max_size=5)
MAYBE_INSTANCE = st.none() | st.sampled_from(INSTANCES)
POOLS = st.sampled_from(list(Role))
UPDATE_FIELDS = st.fixed_dictionaries({}, optional={
    "state": st.sampled_from([s.value for s in JournalState] + ["bogus"]),
    "prefill_instance": MAYBE_INSTANCE,
    "decode_instance": MAYBE_INSTANCE,
    "num_output_tokens": st.integers(-1, 50),
})
OPS = st.one_of(
    st.tuples(st.just("register"), st.sampled_from(INSTANCES), POOLS),
    st.tuples(st.just("heartbeat"), st.sampled_from(INSTANCES), st.integers(0, 9)),
    st.tuples(st.just("deregister"), st.sampled_from(INSTANCES)),
    st.tuples(st.just("list"), st.none() | POOLS),
    st.tuples(st.just("add"), st.sampled_from(INSTANCES), HASHES),
    st.tuples(st.just("remove"), st.sampled_from(INSTANCES), HASHES),
    st.tuples(st.just("match"), HASHES | st.just([1, -1])),
    st.tuples(st.just("start"), st.sampled_from(REQUESTS), MAYBE_INSTANCE, MAYBE_INSTANCE),
    st.tuples(st.just("update"), st.sampled_from(REQUESTS), UPDATE_FIELDS),
    st.tuples(st.just("finish"), st.sampled_from(REQUESTS)),
    st.tuples(st.just("get"), st.sampled_from(REQUESTS)),
    st.tuples(st.just("on"), st.sampled_from(INSTANCES)),
)


def apply(store, op):
    """Runs one op; the observable outcome (result or error type)."""
    kind, *args = op
    try:
        if kind == "register":
            return store.register_instance(info(args[0], args[1]), LONG_TTL_S)
        if kind == "heartbeat":
            return store.heartbeat(args[0], InstanceLoad(num_running=args[1], updated_at=1.0), LONG_TTL_S)
        if kind == "deregister":
            return store.deregister_instance(args[0])
        if kind == "list":
            return store.list_instances(args[0])
        if kind == "add":
            return store.add_prefix_blocks(*args)
        if kind == "remove":
            return store.remove_prefix_blocks(*args)
        if kind == "match":
            return store.match_prefix(args[0])
        if kind == "start":
            return store.journal_start(args[0], entry(args[0], prefill_instance=args[1], decode_instance=args[2]))
        if kind == "update":
            return store.journal_update(args[0], updated_at=3.0, **args[1])
        if kind == "finish":
            return store.journal_finish(args[0])
        if kind == "get":
            return store.journal_get(args[0])
        return store.journal_on_instance(args[0])
    except ValueError as e:
        return ("ValueError", str(e))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=30))
def test_memory_and_redis_agree(redis_url, ops):
    memory, redis_store = MemoryStore(), RedisStore(redis_url, namespace=f"prop-{uuid.uuid4().hex}:")
    try:
        for n, op in enumerate(ops):
            assert apply(memory, op) == apply(redis_store, op), f"op {n}: {op}"
        for iid in INSTANCES:  # the final state, too
            assert memory.journal_on_instance(iid) == redis_store.journal_on_instance(iid)
        assert memory.list_instances() == redis_store.list_instances()
    finally:
        redis_store.close()
