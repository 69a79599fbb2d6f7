"""A KV link that cannot be made: the router says which side to blame, with real Ray actors standing in
for the two instances (each side's `connect` is made to fail or to block; the blame is read from Ray's own
answers: a call that raised, a ping that did not come back)."""
from __future__ import annotations

import asyncio
import time

import pytest

from cluster.disagg.router import InstanceView
from cluster.runtime import links
from cluster.types import Role

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cluster.config import ClusterConfig
    from cluster.runtime.launcher import start_ray

    started = start_ray(ClusterConfig(), num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def _side(ray_local, behaviour: str):
    @ray_local.remote(num_cpus=0, max_concurrency=1)
    class Side:
        """One instance's link end: `connect` answers, raises, or blocks (and with max_concurrency 1 a
        blocked side answers no ping either: as an instance stuck in its rendezvous does)."""

        def connect(self, peer_id, address, is_master, link_key):
            if behaviour == "raise":
                raise ValueError("connect refused")
            if behaviour == "block":
                time.sleep(6)  # past the patched timeouts below, short enough not to hold up the shutdown
            return True

        def ping(self):
            return "side"

    return Side.remote()


def _pair(ray_local, prefill: str, decode: str) -> tuple[InstanceView, InstanceView]:
    p = InstanceView("prefill-0", Role.PREFILL, _side(ray_local, prefill))
    d = InstanceView("decode-0", Role.DECODE, _side(ray_local, decode), link_address="127.0.0.1:1")
    ray_local.get([p.handle.ping.remote(), d.handle.ping.remote()])  # both up before the clock starts
    return p, d


def test_a_refused_link_between_two_live_sides_blames_neither(ray_local):
    prefill, decode = _pair(ray_local, "raise", "ok")
    with pytest.raises(links.LinkFailed) as failed:
        asyncio.run(links._connect_both(prefill, decode, "k1"))
    assert failed.value.view is None and "connect refused" in str(failed.value)


def test_a_side_that_stops_answering_is_blamed_within_the_timeouts(ray_local, monkeypatch):
    """The decode side never comes back from its rendezvous: the wait ends at CONNECT_TIMEOUT_S, its ping
    goes unanswered, and it is the one to blame (CI caught this path raising TypeError: a generator with
    an await in it is an async generator, which `next` cannot take, and the request got a 500)."""
    monkeypatch.setattr(links, "CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(links, "PING_TIMEOUT_S", 1.0)
    prefill, decode = _pair(ray_local, "ok", "block")
    started = time.monotonic()
    with pytest.raises(links.LinkFailed) as failed:
        asyncio.run(links._connect_both(prefill, decode, "k2"))
    assert failed.value.view is decode and "no answer to connect" in str(failed.value)
    assert time.monotonic() - started < 10


def test_a_prefill_still_making_its_links_takes_no_request_while_another_has_one():
    """A prefill instance that just joined (or whose connect is stuck on a peer that is going) is emptier
    than the rest, so by load alone it would take every new request, and each would wait on its link:
    the chaos run's requests that got no byte in 30 s. Linked instances and pairs go first; with none
    linked, placement falls back to load."""
    from cluster.config import RouterConfig
    from cluster.disagg.router import Router
    from cluster.runtime.dispatch import Dispatcher
    from cluster.runtime.leg import Leg
    from cluster.runtime.pools import Pools
    from cluster.disagg.roles import RequestSpec
    from cluster.store.memory import MemoryStore
    from cluster.types import SamplingParams

    pools, kv_links = Pools(), links.KVLinks()
    busy = InstanceView("prefill-0", Role.PREFILL, None, load={"num_queued_prefill_tokens": 5000})
    joined = InstanceView("prefill-1", Role.PREFILL, None)
    for view in (busy, joined, InstanceView("decode-0", Role.DECODE, None)):
        pools.instances[view.instance_id] = view
    dispatcher = Dispatcher(pools, Router(RouterConfig()), kv_links, MemoryStore(), {}, events=None,
                            disaggregated=True)

    def leg(i):
        return Leg(f"r{i}#0", 0, RequestSpec(f"r{i}#0", [1, 2, 3], SamplingParams()), asyncio.Queue())

    assert dispatcher.place(leg(0)) is joined  # nothing linked yet: by load
    kv_links.pairs.add(("prefill-0", "decode-0"))
    assert dispatcher.place(leg(1)) is busy  # the only one with a link
    kv_links.pairs.add(("prefill-1", "decode-0"))
    assert dispatcher.place(leg(2)) is joined  # linked now: by load again
