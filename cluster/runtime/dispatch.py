"""Where a leg runs and how it is handed over between the pools: steps (1)-(3) of cluster.py's docstring.

  `place`     the prefill (or mixed) instance for a leg, by queued prompt tokens and prefix hits,
              its prompt counted there at once (a burst between two heartbeats sees it queued);
  `dispatch`  mixed: submit it there. Disaggregated: the best decode instance reserves blocks while
              the prefill already starts (`prefill_while_reserving`); if that decode refuses, the
              prefill is aborted, the leg renamed (the aborted prefill's deltas must not reach it),
              and the next decode instances reserve first, then the prefill starts.

A `Dispatcher` takes the narrow things it uses: the pools, the router, the KV links, the store, the
table of legs by id (it keeps a renamed leg's id current there), and `ClusterEvents` to hand failures
(`instance_died`, `leg_lost`), aborts (`abort_remote`) and a prefill's early first token (`on_delta`)
back. It moves a leg PLACING -> PREFILLING (leg.py) once both instances have taken it.

While a leg is PLACING its instances' deaths are the dispatcher's to see (`instance_died` leaves such a
leg alone, or it would be placed twice): every call to an instance ends when the instance is found dead
(`Pools.call`), and after each await the dispatcher looks again at `alive` before it commits the leg: a
decode that answered its reserve and died before the prefill answered too is a refusal, not a placement
(that leg went on with no one to decode it).
"""
from __future__ import annotations

import asyncio
import itertools

from cluster.client import Overloaded
from cluster.disagg.router import InstanceView, Router
from cluster.engine.kv_cache import prefix_hashes
from cluster.runtime.leg import Leg, LegState, journal_start
from cluster.runtime.links import KVLinks, LinkFailed
from cluster.runtime.pools import ClusterEvents, Pools
from cluster.types import Role

NO_INSTANCE_RETRY_AFTER_S = 2.0  # a pool left empty waits for a launch (the autoscaler's, or an operator's)


class Dispatcher:
    def __init__(self, pools: Pools, router: Router, links: KVLinks, store, legs: dict[str, Leg],
                 events: ClusterEvents, disaggregated: bool):
        self.pools = pools
        self.router = router
        self.links = links
        self.store = store
        self.legs = legs
        self.events = events
        self.disaggregated = disaggregated
        self.transfer_ids = itertools.count(1)
        self.renames = itertools.count(1)

    def place(self, leg: Leg) -> InstanceView:
        """The instance that prefills `leg` (mixed: runs it), its prompt counted there at once: the next
        request's placement and admission (a burst arrives between two heartbeats) see it queued."""
        spec = leg.spec
        role = Role.PREFILL if self.disaggregated else Role.MIXED
        candidates = self.pools.pool(role)
        if not candidates:  # its last instance died or left while this leg was being placed (again): 503
            raise Overloaded(f"no live {role.value} instance", NO_INSTANCE_RETRY_AFTER_S, unavailable=True,
                             reason="no_instance")
        hits = self._prefix_hits(spec.prompt_token_ids)
        if self.disaggregated:
            # a prefill instance still making its links (one that just joined, or whose connect is stuck on
            # a peer that is going) takes no request while another has a link: nothing waits on a set-up
            linked = self.links.linked_prefills()  # one pass over the pairs, not one per candidate
            candidates = [v for v in candidates if v.instance_id in linked] or candidates
            target = self.router.pick_prefill(candidates, hits, len(spec.prompt_token_ids))
        else:
            target = self.router.pick_mixed(candidates, hits, len(spec.prompt_token_ids))
        target.dispatched(len(spec.prompt_token_ids))
        return target

    async def dispatch(self, leg: Leg, prefill: InstanceView | None = None) -> None:
        """Run `leg` on `prefill` (placed by `place`; None: place it now)."""
        spec = leg.spec
        prefill = prefill or self.place(leg)
        if not self.disaggregated:
            leg.placed(prefill.instance_id, prefill.instance_id)  # placed first: its death restarts the leg
            try:
                await self.pools.call(prefill, prefill.handle.submit.remote(spec))
            except ValueError:
                raise  # the request itself is invalid: the client gets a 400
            except Exception as exc:
                await self.events.instance_died(prefill, f"submit failed: {type(exc).__name__}: {exc}")
            return
        ranked = self.router.rank_decode(self.pools.pool(Role.DECODE), len(spec.prompt_token_ids))
        ranked.sort(key=lambda d: not self.links.linked(prefill.instance_id, d.instance_id))  # linked first, in rank
        if ranked and await self.prefill_while_reserving(leg, prefill, ranked[0]):
            return
        if not _takes_requests(prefill):  # it died or began draining meanwhile: start over on another
            self._rename(leg)  # (one that leaves the pool each time: bounded by the pool's size)
            return await self.dispatch(leg)
        self._rename(leg)  # the aborted prefill's deltas may still come: they must not reach this leg
        spec = leg.spec
        transfer_id = next(self.transfer_ids)
        leg.state = LegState.PLACING  # placed here, not by `instance_died` restarting it too
        leg.prefill_id = prefill.instance_id  # seen by a drain deciding during the reserves below
        for decode in ranked[1:]:
            leg.decode_id = decode.instance_id  # a client gone during the reserve aborts it there
            try:
                await self.links.ensure(prefill, decode)
                if _takes_requests(decode) and await self.pools.call(
                        decode, decode.handle.reserve.remote(spec, prefill.instance_id, transfer_id)) and decode.alive:
                    break
            except ValueError:
                raise  # the request itself is invalid: the client gets a 400
            except LinkFailed as exc:  # a side that died (or stopped answering) goes; else the next decode
                if exc.view is not None:
                    await self.events.instance_died(exc.view, f"link failed: {exc}")
                if exc.view is prefill:  # start over on another prefill instance
                    leg.prefill_id = leg.decode_id = None
                    self._rename(leg)
                    return await self.dispatch(leg)
            except Exception as exc:  # that decode instance is gone: try the next
                await self.events.instance_died(decode, f"reserve failed: {type(exc).__name__}: {exc}")
            leg.decode_id = None
        else:
            raise Overloaded("no decode instance has free KV blocks for this prompt", 2.0)
        if not _takes_requests(prefill):  # it died or began draining during the reserves: start over
            await self.events.abort_remote(decode.instance_id, leg.leg_id)
            leg.prefill_id = leg.decode_id = None
            self._rename(leg)
            return await self.dispatch(leg)
        leg_id = leg.leg_id
        await self._admitted(leg, prefill, decode)
        try:
            await self.pools.call(prefill, prefill.handle.submit_prefill.remote(spec, decode.instance_id, transfer_id))
        except ValueError:
            await self.events.abort_remote(decode.instance_id, leg.leg_id)
            raise
        except Exception as exc:  # prefill died: the decode side's transfer fails and it recomputes
            await self.events.instance_died(prefill, f"submit failed: {type(exc).__name__}: {exc}")
        if leg.leg_id == leg_id:  # not restarted meanwhile: a death found while it was PLACING is seen to here
            await self._check_alive(leg, prefill, decode)

    async def prefill_while_reserving(self, leg: Leg, prefill: InstanceView, decode: InstanceView) -> bool:
        """(3) on the best-ranked decode instance: reserve and start the prefill at once, so the
        reservation's round trip (a Ray call served between two decode steps) is not in TTFT.
        False if that decode instance refused or failed (the prefill is aborted)."""
        spec = leg.spec
        transfer_id = next(self.transfer_ids)
        # named on the leg before the first await: an autoscaler's drain deciding meanwhile sees it (`legs_on`)
        leg.prefill_id, leg.decode_id = prefill.instance_id, decode.instance_id
        leg.state = LegState.PLACING  # the client sees no token before decode has taken the request
        try:
            await self.links.ensure(prefill, decode)
        except LinkFailed as exc:
            leg.prefill_id = leg.decode_id = None
            if exc.view is not None:
                await self.events.instance_died(exc.view, f"link failed: {exc}")
            return False
        if not (_takes_requests(prefill) and _takes_requests(decode)):  # began draining during the link
            leg.prefill_id = leg.decode_id = None
            return False
        reserved, submitted = await asyncio.gather(
            self.pools.call(decode, decode.handle.reserve.remote(spec, prefill.instance_id, transfer_id)),
            self.pools.call(prefill, prefill.handle.submit_prefill.remote(spec, decode.instance_id, transfer_id)),
            return_exceptions=True)
        early_first, leg.early_first = leg.early_first, None
        invalid = next((r for r in (reserved, submitted) if isinstance(r, ValueError)), None)
        if invalid is not None:  # the request itself is invalid: the client gets a 400
            await self.events.abort_remote(decode.instance_id, leg.leg_id)
            await self.events.abort_remote(prefill.instance_id, leg.leg_id)
            leg.prefill_id = leg.decode_id = None
            raise invalid
        if reserved is True and decode.alive:
            leg_id = leg.leg_id
            await self._admitted(leg, prefill, decode)
            if isinstance(submitted, BaseException):  # prefill died: decode's transfer fails and it recomputes
                await self.events.instance_died(prefill, f"submit failed: {type(submitted).__name__}: {submitted}")
            elif early_first is not None:
                await self.events.on_delta(prefill, early_first)
            if leg.leg_id == leg_id:
                await self._check_alive(leg, prefill, decode)
            return True
        # refused, or the decode died after its answer (its death left this PLACING leg to us)
        await self.events.abort_remote(prefill.instance_id, leg.leg_id)
        leg.prefill_id = leg.decode_id = None
        if isinstance(reserved, BaseException):  # that decode instance is gone
            await self.events.instance_died(decode, f"reserve failed: {type(reserved).__name__}: {reserved}")
        if isinstance(submitted, BaseException):  # and so is that prefill instance: `dispatch` places it again
            await self.events.instance_died(prefill, f"submit failed: {type(submitted).__name__}: {submitted}")
        return False

    async def _check_alive(self, leg: Leg, prefill: InstanceView, decode: InstanceView) -> None:
        """Just placed: an instance found dead while the leg was still PLACING left the leg to this
        dispatcher (`instance_died` skips such legs); it is handled now as that death would have."""
        for view in (decode, prefill):
            if not view.alive:
                await self.events.leg_lost(leg, view, f"instance {view.instance_id} died while the leg was placed")
                return

    def _rename(self, leg: Leg) -> None:
        """A new id for the leg (`<base>~r<k>`): whatever the instances still send under the old one is dropped."""
        self.legs.pop(leg.leg_id, None)
        leg.renamed(f"{leg.leg_id.split('~')[0]}~r{next(self.renames)}")
        self.legs[leg.leg_id] = leg

    async def _admitted(self, leg: Leg, prefill: InstanceView, decode: InstanceView) -> None:
        """Decode took the leg: it is placed (PLACING -> PREFILLING), decode counts its tokens (prefill did
        at its pick), the journal says where. Decode's deltas held while it was PLACING go through again
        if decode recomputed meanwhile (RECOMPUTING: they no longer wait for prefill's first token)."""
        replay = leg.placed(prefill.instance_id, decode.instance_id)
        decode.dispatched(len(leg.spec.prompt_token_ids))
        journal_start(self.store, leg)
        for delta in replay:
            await self.events.on_delta(decode, delta)

    def _prefix_hits(self, prompt_token_ids: list[int]) -> dict[str, int]:
        try:
            return self.store.match_prefix(prefix_hashes(prompt_token_ids, self.pools.block_size()))
        except Exception:  # the prefix index is advice; placement works without it
            return {}


def _takes_requests(view: InstanceView) -> bool:
    return view.alive and not view.draining
