"""ClusterClient: the EngineClient of a Ray cluster of prefill, decode (or mixed) instances.

A disaggregated request's life (one "leg" per completion; n > 1 makes n legs):
  (1) the router picks a decode instance that can reserve blocks for the prompt and a
      prefill instance (queued tokens, prefix hits from the store's prefix index);
  (2) the two get a KV link if they have none yet (made on demand: elastic membership);
  (3) decode reserves blocks and posts receives while prefill already queues the prompt
      (its first layers' KV may reach decode before the reservation, and waits in the
      link's buffers for it); if that decode refuses, prefill is aborted and the next
      decode instance is tried, reserving first;
  (4) prefill's first token streams to the client at once (TTFT); its KV streams to
      decode in groups of layers as they are computed; decode lands it and continues; prefill frees its copy
      when decode's first token shows the KV arrived (or after a timeout);
  (5) a failed transfer -> decode recomputes the prompt at once and says so (an event); the leg
      checks decode's first token against any the client already has (a different one restarts it);
      a dead decode instance -> the leg restarts elsewhere from prompt + tokens so far; a dead
      prefill instance -> decode recomputes, or the leg restarts if decode had the KV but the client
      not the first token (leg.py); every leg ends in a finish reason or an error the client sees.
A leg's state machine is in leg.py.
Steps (1)-(3) are the `Dispatcher`'s (dispatch.py). Each instance is read by one long-poll task
(all its deltas per call); a heartbeat task (heartbeat.py) refreshes loads, the store's registry and
prefix index, and notices dead instances.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from cluster.client import EngineClient, ModelInfo, Overloaded
from cluster.config import ClusterConfig
from cluster.disagg.router import InstanceView, Router
from cluster.runtime.admission import admit
from cluster.disagg.roles import EventKind, InstanceEvent, RequestSpec
from cluster.runtime.dispatch import NO_INSTANCE_RETRY_AFTER_S, Dispatcher
from cluster.runtime.instance import STALL_KEYS
from cluster.runtime.latency import LatencyWindow
from cluster.runtime.heartbeat import Heartbeat, instance_info
from cluster.runtime.leg import Leg, LegState, journal_finish
from cluster.runtime.links import KVLinks
from cluster.runtime.pools import ClusterEvents, Pools
from cluster.types import FinishReason, Role, SamplingParams, TokenDelta

log = logging.getLogger(__name__)
MAX_RETRIES = 2
POLL_S = 0.5  # an instance's delta poll returns after this long without a delta
TELL_TIMEOUT_S = 5.0  # an abort or confirmation not answered by then is given up (the heartbeat finds a dead one)


class ClusterClient(EngineClient, ClusterEvents):
    def __init__(self, config: ClusterConfig, info: ModelInfo, store, metrics=None):
        self.config = config
        self._info = info
        self.store = store
        self.metrics = metrics
        self.router = Router(config.router)
        self.pools = Pools()
        self.instances = self.pools.instances  # by id (dead ones too, marked)
        self.pool = self.pools.pool
        self.legs: dict[str, Leg] = {}
        self.links = KVLinks()
        self.tasks: list[asyncio.Task] = []
        self.poll_tasks: dict[str, asyncio.Task] = {}
        self.background: set[asyncio.Task] = set()  # confirmations, and dead instances' peers dropping their links
        self.num_pending = 0
        self.draining = False  # the shutdown began: nothing new is admitted
        self.latency = LatencyWindow()  # TTFT and ITL per pool as the clients saw them (the autoscaler's)
        self.finished_tokens = {role: [0, 0] for role in Role}  # per pool that ended them: (legs, output tokens)
        # called with an instance found dead, once its legs moved: the launcher releases its actor and placement
        # group (a dead actor's group would hold its GPUs; on a lost node Ray would even place the group again)
        self.on_instance_dead = None
        self.dispatcher = Dispatcher(self.pools, self.router, self.links, store, self.legs, self,
                                     config.disaggregated)

    # -- membership ----------------------------------------------------------------
    async def add_instance(self, instance_id: str, role: Role, handle) -> None:
        """Join an instance (at start or at run time): it takes traffic from its next heartbeat on."""
        info = await handle.info.remote()
        view = InstanceView(instance_id, role, handle, info["block_size"], info["num_blocks"])
        view.link_address = info["link_address"]
        view.startup_s = info.get("startup_s") or {}
        if info.get("prefill_tokens_per_s"):  # timed at its start: admission has a rate before any queue
            view.rates.append(info["prefill_tokens_per_s"])
        asked_s = time.monotonic()
        view.refresh(await handle.stats.remote(), asked_s=asked_s)
        self.instances[instance_id] = view
        self.poll_tasks[instance_id] = asyncio.create_task(self._poll(view))
        try:
            self.store.register_instance(instance_info(view), self.config.router.instance_ttl_s)
        except Exception:  # the store may be away: the heartbeat registers it once it is back
            log.warning("could not register %s in the state store", instance_id)
        self.links.prewarm(view, self.pool)

    async def remove_instance(self, instance_id: str) -> None:
        """An instance leaves (scaled in, or about to rejoin with another role): no request is placed on
        it, its poll stops, the store and its peers forget it. Its legs should have ended (`migrate`); any
        still on it (one placed while its drain was deciding) move elsewhere first, never left to hang."""
        view = self.instances.get(instance_id)
        if view is None:
            return
        view.draining, leaving = True, view.alive  # no placement here while its last legs move
        # a dead one's legs were seen to at its death (restarted, or recomputed by their decode instance)
        if leaving and (moved := await self.migrate(instance_id, "its instance left the pool")):
            log.warning("%s left with %d legs on it: they restart elsewhere", instance_id, moved)
        self.instances.pop(instance_id, None)
        view.alive = False
        await self._end_poll(self.poll_tasks.pop(instance_id, None), leaving)
        try:
            self.store.deregister_instance(instance_id)
        except Exception:  # the store may be away: its entry expires
            log.warning("could not deregister %s", instance_id)
        await self.links.drop(instance_id, self.instances)
        if self.metrics is not None:
            self.metrics.remove_instance(view.role.value, instance_id, model=self._info.name)

    async def _end_poll(self, task: asyncio.Task | None, leaving: bool) -> None:
        """A live instance's poll ends once its call in flight returns (within POLL_S: `alive` is off): cut
        short, that call would still run on the actor, take its next deltas and hand them to no one (an
        instance that flipped roles lost the first tokens of its first prefills so, and they hung). A dead
        one's is cut at once."""
        if task is not None and not (leaving and (await asyncio.wait({task}, timeout=POLL_S + TELL_TIMEOUT_S))[0]):
            task.cancel()

    def legs_on(self, instance_id: str) -> list[Leg]:
        """The live legs that still need an instance: those it decodes (or runs, mixed), and those whose
        prompt it prefills or whose KV it has yet to hand over."""
        handing_over = (LegState.PLACING, LegState.PREFILLING, LegState.TRANSFERRING)
        return [leg for leg in self.legs.values() if not leg.done and (
            leg.decode_id == instance_id or (leg.prefill_id == instance_id and leg.state in handing_over))]

    async def migrate(self, instance_id: str, why: str) -> int:
        """Move every live leg off an instance that is going away: each restarts elsewhere from its prompt
        and the tokens its client already has (the KV is recomputed there). Returns how many moved. A leg
        still being placed is the `Dispatcher`'s: it sees the instance leave in its own answers (restarting
        it here too would run it twice, and its client would get the tokens of both)."""
        legs = [leg for leg in self.legs_on(instance_id) if leg.state != LegState.PLACING]
        for leg in legs:
            await self._restart(leg, why, instance_id, leg.prefill_id if leg.decode_id == instance_id else leg.decode_id)
        return len(legs)

    async def start(self) -> None:
        heartbeat = Heartbeat(self.pools, self.store, self.metrics, self._info.name, self.config.router, self)
        self.tasks.append(asyncio.create_task(heartbeat.run()))

    # -- EngineClient ----------------------------------------------------------------
    def info(self) -> ModelInfo:
        return self._info

    async def health(self) -> dict:
        pools = {r.value: len(self.pool(r)) for r in Role}
        if self.config.disaggregated and (not pools["prefill"] or not pools["decode"]):
            raise RuntimeError(f"a pool has no live instance: {pools}")
        if not self.config.disaggregated and not pools["mixed"]:
            raise RuntimeError("no live mixed instance")
        keys = ("mean_step_ms", "mean_decode_step_ms", "num_running", "num_waiting", "num_queued_prefill_tokens",
                "prefill_tokens_per_s", "num_held_transfers", *STALL_KEYS)
        instances = {v.instance_id: v.snapshot(keys) for v in self.instances.values()}
        return {"status": "ok", "pools": pools, "in_flight": self.num_pending, "draining": self.draining,
                "store": self.store.status(), "instances": instances}

    async def drain(self, timeout_s: float) -> int:
        """The shutdown: admit nothing more, let the requests in flight finish within `timeout_s` (their
        legs still retry elsewhere if an instance dies meanwhile), then end the rest with an error."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.num_pending
        for leg in [l for l in self.legs.values() if not l.done]:
            leg.fail(f"the server shut down: still running at the drain deadline ({timeout_s} s)")
            for instance_id in {leg.prefill_id, leg.decode_id} - {None}:
                await self.abort_remote(instance_id, leg.leg_id)
        return left

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[TokenDelta]:
        if self.draining:
            raise Overloaded("draining: the server is shutting down", 1.0, unavailable=True, reason="draining")
        if self.num_pending >= self.config.api.max_pending:
            raise Overloaded(f"{self.num_pending} requests in flight (limit {self.config.api.max_pending})", 1.0)
        prefill_role, decode_role = (Role.PREFILL, Role.DECODE) if self.config.disaggregated else (Role.MIXED, Role.MIXED)
        for role in {prefill_role, decode_role}:  # every instance of a pool lost (until one is launched): 503
            if not self.pool(role):
                raise Overloaded(f"no live {role.value} instance", NO_INSTANCE_RETRY_AFTER_S, unavailable=True,
                                 reason="no_instance")
        admit(self.config.api, self.pool(prefill_role), self.pool(decode_role))  # past saturation: 429, not a queue
        queue: asyncio.Queue = asyncio.Queue()
        legs = self._legs(request_id, prompt_token_ids, params, prompt, queue)
        self.num_pending += 1
        try:
            for leg in legs:
                self.legs[leg.leg_id] = leg
            # placed and counted now, before anything yields: a burst's next request is admitted against
            # a queue that holds this one (counted inside the tasks, a burst of 48 on one event-loop turn
            # all passed admission)
            placed = [self.dispatcher.place(leg) for leg in legs]
            await asyncio.gather(*(self.dispatcher.dispatch(leg, target) for leg, target in zip(legs, placed)))
            remaining = len(legs) if self.config.disaggregated else params.n
            started_s, last_s = time.monotonic(), {}
            while remaining:
                delta = await queue.get()
                if delta.finish_reason is not None:
                    remaining -= 1
                if delta.token_ids and delta.pool:
                    self._observe(delta, started_s, last_s)
                yield replace(delta, request_id=request_id)
        finally:
            self.num_pending -= 1
            for leg in legs:
                if not leg.done:
                    self._abort_leg(leg)
                self.legs.pop(leg.leg_id, None)

    def _observe(self, delta: TokenDelta, started_s: float, last_s: dict) -> None:
        """A completion's first token (TTFT, to the pool that made it) or next ones (ITL, per token)."""
        now, role = time.monotonic(), Role(delta.pool)
        before = last_s.get(delta.index)
        if before is None:
            self.latency.add(role, "ttft", now - started_s, now)
        else:
            for _ in delta.token_ids:
                self.latency.add(role, "itl", (now - before) / len(delta.token_ids), now)
        last_s[delta.index] = now

    def _legs(self, request_id, prompt_token_ids, params, prompt, queue) -> list[Leg]:
        if not self.config.disaggregated:
            return [Leg(request_id, 0, RequestSpec(request_id, prompt_token_ids, params, prompt), queue)]
        legs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            spec = RequestSpec(f"{request_id}#{i}", list(prompt_token_ids), replace(params, n=1, seed=seed), prompt)
            legs.append(Leg(spec.request_id, i, spec, queue))
        return legs

    async def abort(self, request_id: str) -> None:
        def of_request(leg_id: str) -> bool:  # `<request>`, `<request>#<i>`, each maybe `~<restart>`
            base = leg_id.split("~")[0]
            return base == request_id or base.startswith(request_id + "#")

        for leg in [l for l in self.legs.values() if of_request(l.leg_id)]:
            self._abort_leg(leg)

    async def close(self) -> None:
        for task in self.tasks + list(self.poll_tasks.values()) + list(self.background):
            task.cancel()
        self.links.cancel()

    # -- (4) deltas ---------------------------------------------------------------------------
    async def _poll(self, view: InstanceView) -> None:
        while view.alive:
            try:
                deltas, events, error = await view.handle.next_deltas.remote(POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RayActorError: the instance process is gone
                await self.instance_died(view, f"{type(exc).__name__}: {exc}")
                return
            if error:
                await self.instance_died(view, error)
                return
            try:
                for event in events:  # before the deltas: a recomputed first token may be among them
                    self.on_event(event)
                for delta in deltas:
                    await self.on_delta(view, delta)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad delta must not stop this instance's stream for everyone
                log.exception("handling deltas of %s", view.instance_id)

    def on_event(self, event: InstanceEvent) -> None:
        leg = self.legs.get(event.request_id)
        if leg is not None and event.kind == EventKind.RECOMPUTING:
            leg.recomputing()

    async def on_delta(self, view: InstanceView, delta: TokenDelta) -> None:
        leg = self.legs.get(delta.request_id)
        if leg is None:
            return
        delta = replace(delta, pool=view.role.value, instance=view.instance_id)  # the metrics' labels
        disagg = self.config.disaggregated  # a leg per completion; a mixed-pool leg carries all n
        out = leg.deliver(delta, from_prefill=view.role == Role.PREFILL, disaggregated=disagg,
                          completions=1 if disagg else leg.spec.params.n, prefill_listed=leg.prefill_id in self.instances)
        if out.finished:
            journal_finish(self.store, leg)
            self.finished_tokens[view.role] = [a + b for a, b in zip(self.finished_tokens[view.role], (1, len(leg.output_ids)))]
        if out.confirm:
            self._confirm(leg)
        if out.abort_decode:
            await self.abort_remote(leg.decode_id, leg.leg_id)
        if out.restart:  # decode's recomputed first token is not the client's, or its prefill died (leg.py);
            # off this poll: the retry's placement must not hold up the other streams of this instance
            self._background(self._restart(leg, "its prefill instance died before the first token reached the "
                                           "client" if leg.prefill_lost else "the recomputed first token differs "
                                           "from the one sent", leg.decode_id))

    # -- (5) failures ---------------------------------------------------------------------------
    async def instance_died(self, view: InstanceView, why: str) -> None:
        if not view.alive:
            return
        self.pools.mark_dead(view)  # every dispatch call still waiting on it ends now
        log.warning("instance %s died: %s", view.instance_id, why.splitlines()[-1] if why else why)
        try:
            self.store.deregister_instance(view.instance_id)
        except Exception:  # the store may be away: its entry expires
            log.warning("could not deregister %s", view.instance_id)
        # its peers drop their links (a transfer still coming from it fails there: decode recomputes); not
        # awaited: a peer on the same lost node would hold up the legs' retries until Ray gives up on it
        self._background(self.links.drop(view.instance_id, self.instances))
        # a leg still being placed (PLACING) is left to the `Dispatcher`, which checks its instances after each
        # of its awaits (`leg_lost`): restarting it here too would place it twice
        legs = [l for l in self.legs.values() if not l.done and l.state != LegState.PLACING
                and view.instance_id in (l.prefill_id, l.decode_id)]
        await asyncio.gather(*(self.leg_lost(leg, view, why) for leg in legs))
        if self.on_instance_dead is not None:
            task = asyncio.get_running_loop().create_task(self.on_instance_dead(view.instance_id))
            self.tasks.append(task)

    async def leg_lost(self, leg: Leg, view: InstanceView, why: str) -> None:
        """`view` died with `leg` on it: a decode (or mixed) instance's leg restarts elsewhere; a prefill
        instance's is left to its decode instance unless the client has no first token and cannot get one
        (`Leg.lost_prefill`)."""
        if leg.done or leg.state == LegState.PLACING or self.legs.get(leg.leg_id) is not leg:
            return  # ended, being placed (the dispatcher's), or already restarting
        if leg.decode_id == view.instance_id:
            await self._restart(leg, why, leg.prefill_id if leg.state == LegState.PREFILLING else None)
        elif leg.prefill_id == view.instance_id and self.config.disaggregated and leg.lost_prefill():
            await self._restart(leg, why, leg.decode_id)

    def _restart(self, leg: Leg, why: str, *abort_on: str | None):
        """Take the leg out of the table at once (what its instances still send under its id, or a death
        seen by another path meanwhile, no longer reaches it: it restarts once), then (awaitable) abort
        it where it still runs (`abort_on`) and retry it, unless its client ended it meanwhile."""
        self.legs.pop(leg.leg_id, None)
        return self._abort_and_retry(leg, leg.leg_id, why, abort_on)

    async def _abort_and_retry(self, leg: Leg, leg_id: str, why: str, abort_on) -> None:
        for instance_id in dict.fromkeys(abort_on):
            await self.abort_remote(instance_id, leg_id)
        if leg.leg_id == leg_id and not leg.done:
            await self._retry(leg, why)

    async def _retry(self, leg: Leg, why: str) -> None:
        """Restart a leg elsewhere from its prompt and the tokens the client already has."""
        # a mixed-pool leg carries all n completions; their tokens cannot be resumed as one prompt
        several = not self.config.disaggregated and leg.spec.params.n > 1
        if several or leg.retries >= MAX_RETRIES or not self.pool(Role.DECODE if self.config.disaggregated else Role.MIXED):
            leg.fail(f"instance failed and no retry was possible: {why[-200:]}")
            return
        journal_finish(self.store, leg)  # its entry names the dead instance; the retry journals its own
        self.legs.pop(leg.leg_id, None)
        leg.resume()
        self.legs[leg.leg_id] = leg
        try:
            await self.dispatcher.dispatch(leg)
        except Exception as exc:
            leg.fail(f"retry failed: {exc}")

    def _confirm(self, leg: Leg) -> None:
        """Tell prefill it may free its copy, without holding up this decode instance's deltas: awaited in
        line, each confirmation would wait for the prefill step in progress, and the streams behind it too."""
        self._background(self._tell(leg.prefill_id, "confirm", leg.leg_id))

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _abort_leg(self, leg: Leg) -> None:
        """End `leg` here and tell its instances, off the caller: it never suspends. The caller is often
        a request being cancelled (its client left) inside Starlette's cancel scope, where every await is
        cancelled too: awaited here, the first instance's abort was cut off and the other never sent, so
        a decode ran on for a client that had gone and a prefill held its copy (CI caught both)."""
        if not leg.done:  # wake the request's consumer, if it is still waiting
            leg.queue.put_nowait(TokenDelta(leg.leg_id, leg.index, [], "", finish_reason=FinishReason.ABORT))
        leg.state = LegState.FAILED
        self.legs.pop(leg.leg_id, None)
        journal_finish(self.store, leg)
        for instance_id in {leg.prefill_id, leg.decode_id} - {None}:
            self._background(self.abort_remote(instance_id, leg.leg_id))

    async def abort_remote(self, instance_id: str | None, leg_id: str) -> None:
        await self._tell(instance_id, "abort", leg_id)

    async def _tell(self, instance_id: str | None, method: str, leg_id: str) -> None:
        """`method(leg_id)` on a live instance; one that died meanwhile took the leg's KV with it."""
        view = self.instances.get(instance_id or "")
        if view is not None and view.alive:
            try:
                await asyncio.wait_for(self.pools.call(view, getattr(view.handle, method).remote(leg_id)), TELL_TIMEOUT_S)
            except Exception:  # dead (its death restarts its legs), or too slow: the leg is gone from here anyway
                pass
