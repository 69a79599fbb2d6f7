"""The router's side of the KV links: which prefill-decode pairs are linked, made on demand.

  (1) `prewarm`: a joining prefill (decode) instance is linked to every live decode (prefill) one
      at once, in the background, so that no request waits for a link's set-up (an NCCL
      communicator takes a good part of a second); a pre-warm that fails is made again by
      (2) `ensure`: the first dispatch that needs the link makes it (the dispatcher prefers pairs already
      linked, so only a request with no linked pair left waits for one; both sides connect at
      once, the decode side listening, under a key of this attempt's), one at a time per pair; a side
      that still has a link to the peer (an adopted instance, one that switched roles) replaces it;
  (3) `drop`: an instance's links are forgotten at once and its live peers disconnect from it, each
      call bounded (a peer that died too, undetected yet, must not hold up the rest).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

from cluster.disagg.router import InstanceView
from cluster.runtime.pools import answers
from cluster.types import Role

log = logging.getLogger(__name__)


CONNECT_TIMEOUT_S = 20.0  # an NCCL communicator takes about a second; gloo less
PING_TIMEOUT_S = 5.0


class LinkFailed(RuntimeError):
    """A link could not be made; `view` is the side to blame (dead or not answering), None if neither."""

    def __init__(self, view: InstanceView | None, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.view = view


class KVLinks:
    def __init__(self):
        self.pairs: set[tuple[str, str]] = set()  # (prefill id, decode id) linked
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.tasks: list[asyncio.Task] = []

    def linked(self, prefill_id: str, decode_id: str) -> bool:
        return (prefill_id, decode_id) in self.pairs

    def linked_prefills(self) -> set[str]:
        """The prefill instances with at least one link."""
        return {prefill_id for prefill_id, _ in self.pairs}

    def prewarm(self, view: InstanceView, pool) -> None:
        """(1) `pool(role)`: the live instances of a role."""
        if view.role == Role.PREFILL:
            pairs = [(view, decode) for decode in pool(Role.DECODE)]
        elif view.role == Role.DECODE:
            pairs = [(prefill, view) for prefill in pool(Role.PREFILL)]
        else:
            return
        for prefill, decode in pairs:
            task = asyncio.create_task(self.ensure(prefill, decode))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: never "never retrieved"
            self.tasks.append(task)

    async def ensure(self, prefill: InstanceView, decode: InstanceView) -> None:
        """(2)"""
        key = (prefill.instance_id, decode.instance_id)
        if key in self.pairs:
            return
        async with self.locks.setdefault(key, asyncio.Lock()):
            if key in self.pairs:
                return
            await _connect_both(prefill, decode, uuid.uuid4().hex[:12])  # this attempt's key: both sides
            # meet under it, whatever their history
            self.pairs.add(key)

    async def drop(self, dead_id: str, instances: dict[str, InstanceView]) -> None:
        """(3)"""
        peers = []
        for key in [k for k in self.pairs if dead_id in k]:
            self.pairs.discard(key)
            other = instances.get(key[1] if key[0] == dead_id else key[0])
            if other is not None and other.alive:
                peers.append(other)
        await asyncio.gather(*(_disconnect(other, dead_id) for other in peers))

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


async def _connect_both(prefill: InstanceView, decode: InstanceView, link_key: str) -> None:
    """Both sides connect at once; the first failure ends the wait (the other side may block in its
    rendezvous until its peer comes, which a dead one never does), and so does `CONNECT_TIMEOUT_S`.
    Blamed (`LinkFailed.view`): a side whose actor died, or that no longer answers a ping; none when
    both answer (the pair is not linked this time: a dispatch tries another, nothing is marked dead)."""
    from ray.exceptions import RayActorError

    address, started_s = decode.link_address, time.monotonic()
    calls = {asyncio.ensure_future(decode.handle.connect.remote(prefill.instance_id, address, True, link_key)): decode,
             asyncio.ensure_future(prefill.handle.connect.remote(decode.instance_id, address, False, link_key)): prefill}
    done, pending = await asyncio.wait(calls, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_EXCEPTION)
    for call in pending:
        call.cancel()
    failed = [(calls[c], c.exception()) for c in done if c.exception() is not None]
    dead = next((v for v, e in failed if isinstance(e, RayActorError)), None)
    if not failed and not pending:
        return
    cause = failed[0][1] if failed else TimeoutError(f"no answer to connect within {CONNECT_TIMEOUT_S:.0f} s")
    if dead is None:  # who is to blame: the side that no longer answers, if either
        for view in [calls[c] for c in pending] or [prefill, decode]:
            if not await answers(view, PING_TIMEOUT_S):
                dead = view
                break
    log.warning("KV link %s -> %s not made after %.1f s (%s; still waiting: %s; blamed: %s)", prefill.instance_id,
                decode.instance_id, time.monotonic() - started_s, cause,
                [calls[c].instance_id for c in pending] or "none", dead.instance_id if dead else "neither")
    raise LinkFailed(dead, cause)


async def _disconnect(peer: InstanceView, dead_id: str) -> None:
    try:
        await asyncio.wait_for(peer.handle.disconnect.remote(dead_id), PING_TIMEOUT_S)
    except Exception:  # the peer died too, or does not answer: its own death (or its timeouts) end its side
        pass
