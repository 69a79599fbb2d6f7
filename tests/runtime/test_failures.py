"""Instances die (or leave and rejoin) mid-request: no request hangs, none is lost silently, the others are
untouched."""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from cluster import LLM, SamplingParams
from cluster.types import FinishReason
from tests.runtime.conftest import RunningCluster, cluster_config

pytestmark = pytest.mark.slow
LONG = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LLM(model=tiny_model, device="cpu", progress=False)


async def _collect(client, request_id, prompt, params, on_token=None):
    tokens, reasons, errors = [], [], []
    async for delta in client.generate(request_id, prompt, params):
        tokens.extend(delta.token_ids)
        if on_token is not None:
            await on_token(len(tokens))
        if delta.finish_reason is not None:
            reasons.append(delta.finish_reason)
            errors.append(delta.error)
    return tokens, reasons, errors


def test_decode_killed_mid_stream_is_retried_and_others_untouched(tiny_model, reference):
    running = RunningCluster(cluster_config(tiny_model, prefill=1, decode=2))
    try:
        client = running.client
        victim_prompt, bystander_prompt = list(range(10, 40)), list(range(50, 70))
        killed = {}

        async def scenario():
            async def kill_when_streaming(num_tokens):
                if num_tokens == 20 and not killed:
                    leg = client.legs["victim#0"]
                    killed["id"] = leg.decode_id
                    killed["t"] = time.monotonic()
                    running.cluster.kill_instance(leg.decode_id)

            victim = asyncio.create_task(_collect(client, "victim", victim_prompt, LONG, kill_when_streaming))
            await asyncio.sleep(0.05)
            bystander = asyncio.create_task(_collect(client, "bystander", bystander_prompt, LONG))
            return await asyncio.wait_for(asyncio.gather(victim, bystander), timeout=120)

        (v_tokens, v_reasons, v_errors), (b_tokens, b_reasons, _) = running.run(scenario(), timeout_s=150)
        assert killed, "the victim never streamed 20 tokens"
        expected = reference.generate([victim_prompt, bystander_prompt], LONG)
        if v_reasons == [FinishReason.ERROR]:  # allowed: a clear error, fast
            assert v_errors[0]
        else:  # retried on the surviving decode instance: the stream continues where it stopped
            assert v_reasons == [FinishReason.LENGTH] and len(v_tokens) == 600
            assert v_tokens == expected[0].outputs[0].token_ids
        assert b_reasons == [FinishReason.LENGTH] and b_tokens == expected[1].outputs[0].token_ids
        deadline = time.monotonic() + 30
        while killed["id"] in running.cluster.actors and time.monotonic() < deadline:  # bounded
            time.sleep(0.1)
        # found dead, then released: gone from the router, its actor and placement group with it
        assert killed["id"] not in client.instances and killed["id"] not in running.cluster.groups
    finally:
        running.stop()


def test_a_request_whose_decode_dies_twice_continues_where_it_stopped_both_times(tiny_model, reference):
    """Two retries of one request (MAX_RETRIES = 2), each from the client's prompt and every token it
    already has: the stream ends as one engine's (a second retry built on the first's prompt repeated
    its tokens and spent them twice against max_tokens)."""
    running = RunningCluster(cluster_config(tiny_model, prefill=1, decode=3))
    try:
        client = running.client
        prompt = list(range(10, 40))
        killed: list[str] = []

        async def scenario():
            async def kill_at(num_tokens):
                if num_tokens in (20, 60) and len(killed) < (1 if num_tokens == 20 else 2):
                    leg = next(iter(client.legs.values()))
                    killed.append(leg.decode_id)
                    running.cluster.kill_instance(leg.decode_id)

            return await asyncio.wait_for(_collect(client, "twice", prompt, LONG, kill_at), timeout=120)

        tokens, reasons, errors = running.run(scenario(), timeout_s=150)
        assert len(killed) == 2 and len(set(killed)) == 2, killed
        assert reasons == [FinishReason.LENGTH], errors
        assert tokens == reference.generate([prompt], LONG)[0].outputs[0].token_ids
        for dead in killed:  # the journal no longer places the request on an instance that died
            assert client.store.journal_on_instance(dead) == []
    finally:
        running.stop()


def test_prefill_killed_mid_request_recomputes_on_decode(tiny_model, reference):
    running = RunningCluster(cluster_config(tiny_model, prefill=2, decode=1, transfer_timeout_s=3.0))
    try:
        client = running.client
        prompt = [7 + (i * 13) % 800 for i in range(900)]
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

        async def scenario():
            task = asyncio.create_task(_collect(client, "r", prompt, params))
            while "r#0" not in client.legs or client.legs["r#0"].prefill_id is None:
                await asyncio.sleep(0.001)
            running.cluster.kill_instance(client.legs["r#0"].prefill_id)  # while its prompt is in flight
            t0 = time.monotonic()
            result = await asyncio.wait_for(task, timeout=60)
            return result, time.monotonic() - t0

        (tokens, reasons, errors), seconds = running.run(scenario(), timeout_s=90)
        assert reasons == [FinishReason.LENGTH], errors
        assert tokens == reference.generate([prompt], params)[0].outputs[0].token_ids
        assert seconds < 20
        import ray

        decode = next(v for v in client.instances.values() if v.role.value == "decode")
        assert ray.get(decode.handle.stats.remote())["num_recomputed"] >= 1
    finally:
        running.stop()


def test_a_prefill_that_dies_after_its_kv_landed_but_before_its_first_token_came_restarts_the_leg(tiny_model,
                                                                                                  reference):
    """The prefill sends the KV and the first token to decode, then its delta (the client's first token)
    dies with it: decode runs on, its deltas held for a first token that never comes (the chaos run's
    prefill kill hung so). The leg restarts from the prompt and the stream is the engine's, whole."""
    running = RunningCluster(cluster_config(tiny_model, prefill=2, decode=1))
    try:
        client = running.client
        prompt, params = list(range(10, 70)), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        on_delta, seen = client.on_delta, {}

        async def kill_once_decode_ran_ahead(view, leg):
            for _ in range(1000):  # bounded: 10 s for decode's first held delta
                if leg.held:
                    break
                await asyncio.sleep(0.01)
            seen["held"] = len(leg.held)
            running.cluster.kill_instance(view.instance_id)

        async def lose_prefills_first_token(view, delta):
            leg = client.legs.get(delta.request_id)
            if view.role.value == "prefill" and leg is not None and delta.request_id == "v#0" and "leg" not in seen:
                seen["leg"] = leg  # this delta is lost, as if its instance died before the router polled it
                seen["task"] = asyncio.create_task(kill_once_decode_ran_ahead(view, leg))
                return
            await on_delta(view, delta)

        client.on_delta = lose_prefills_first_token

        async def scenario():
            return await asyncio.wait_for(_collect(client, "v", prompt, params), timeout=60)

        tokens, reasons, errors = running.run(scenario(), timeout_s=90)
        assert seen["held"] >= 1, "decode never ran ahead of the lost first token"
        assert reasons == [FinishReason.LENGTH], errors
        assert tokens == reference.generate([prompt], params)[0].outputs[0].token_ids
        assert seen["leg"].retries == 1
    finally:
        running.stop()


def test_a_decode_that_dies_after_answering_its_reserve_is_not_given_the_leg(tiny_model, reference):
    """The dispatcher reserves on decode and submits to prefill at once; decode answers, then dies before
    prefill does. Its death is found while the leg is still being placed (left to the dispatcher), so the
    dispatcher must see it before it commits: the leg went to the dead decode and hung after its first token."""
    running = RunningCluster(cluster_config(tiny_model, prefill=1, decode=2))
    try:
        client = running.client
        prompt, params = list(range(10, 70)), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        call, killed = client.pools.call, []

        async def die_after_answering(view, ref):
            answer = await call(view, ref)
            if view.role.value == "decode" and not killed:  # the first decode call: the leg's reserve
                killed.append(view.instance_id)
                running.cluster.kill_instance(view.instance_id)
                for _ in range(1000):  # bounded: 10 s for its poll to find it dead
                    if not view.alive:
                        break
                    await asyncio.sleep(0.01)
            return answer

        client.pools.call = die_after_answering

        async def scenario():
            return await asyncio.wait_for(_collect(client, "d", prompt, params), timeout=60)

        tokens, reasons, errors = running.run(scenario(), timeout_s=90)
        assert killed, "no decode call was seen"
        assert reasons == [FinishReason.LENGTH], errors
        assert tokens == reference.generate([prompt], params)[0].outputs[0].token_ids
    finally:
        running.stop()


def test_a_prefill_and_a_decode_that_stop_answering_together_are_found_dead_and_the_stream_goes_on(tiny_model,
                                                                                                    reference):
    """A lost node's processes may raise nothing: frozen here (SIGSTOP), a linked prefill and decode pair,
    the stream's own. The heartbeat asks every instance at once, its stats call and then a ping bounded by
    the TTL (3 s here), and finds both dead; their peers drop the links in the background (a disconnect
    sent to the other frozen one held up the death's handling, and with it the heartbeat, for good); the
    stream continues on the surviving pair, whole and the engine's."""
    import os
    import signal

    running = RunningCluster(cluster_config(tiny_model, prefill=2, decode=2))
    stopped = []
    try:
        client = running.client
        prompt = list(range(10, 40))
        frozen = {}

        async def scenario():
            async def freeze_when_streaming(num_tokens):
                if num_tokens == 20 and not frozen:
                    leg = client.legs["f#0"]
                    for instance_id in (leg.prefill_id, leg.decode_id):
                        pid = await running.cluster.actors[instance_id].__ray_call__.remote(lambda actor: os.getpid())
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
                    frozen.update(ids=(leg.prefill_id, leg.decode_id), t=time.monotonic())

            result = await asyncio.wait_for(_collect(client, "f", prompt, LONG, freeze_when_streaming), timeout=60)
            return result, time.monotonic() - frozen["t"]

        (tokens, reasons, errors), seconds = running.run(scenario(), timeout_s=90)
        assert reasons == [FinishReason.LENGTH], errors
        assert tokens == reference.generate([prompt], LONG)[0].outputs[0].token_ids
        assert seconds < 20, seconds  # found within two TTLs and a beat, then the rest of the stream
        deadline = time.monotonic() + 30
        while set(frozen["ids"]) & set(running.cluster.actors) and time.monotonic() < deadline:  # bounded
            time.sleep(0.1)
        assert not set(frozen["ids"]) & set(client.instances), "not both found dead and released"
    finally:
        for pid in stopped:  # released (killed) by the cluster once found dead, unless the test failed before
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        running.stop()


def test_an_instance_that_leaves_and_rejoins_at_once_loses_no_delta(tiny_model, reference):
    """What a role flip does to the router (remove, the actor's set_role, add), without the flip: the
    rejoined prefill's first requests complete. Its old poll's call, cut short at the remove, still ran on
    the actor and took their first tokens: the flip test hung on them about one run in three."""
    from cluster.types import Role

    running = RunningCluster(cluster_config(tiny_model, prefill=1, decode=1))
    try:
        client = running.client
        prefill_id = next(v.instance_id for v in client.instances.values() if v.role == Role.PREFILL)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        prompts = [list(range(10 + i, 40 + i)) for i in range(4)]

        async def scenario():
            results = []
            for i, prompt in enumerate(prompts):
                await client.remove_instance(prefill_id)
                await client.add_instance(prefill_id, Role.PREFILL, running.cluster.actors[prefill_id])
                results.append(await asyncio.wait_for(_collect(client, f"rejoin{i}", prompt, params), timeout=20))
            return results

        results = running.run(scenario(), timeout_s=150)
        expected = reference.generate(prompts, params)
        for (tokens, reasons, errors), want in zip(results, expected):
            assert reasons == [FinishReason.LENGTH], errors
            assert tokens == want.outputs[0].token_ids
    finally:
        running.stop()


def test_dead_mixed_instance_ends_every_completion_with_an_error(tiny_model):
    running = RunningCluster(cluster_config(tiny_model, prefill=0, decode=0, mixed=1))
    try:
        client = running.client
        params = SamplingParams(max_tokens=1500, temperature=1.0, n=2, seed=3, ignore_eos=True)

        async def scenario():
            async def kill_at(num_tokens):
                if num_tokens == 10:
                    running.cluster.kill_instance(client.legs["m"].decode_id)

            t0 = time.monotonic()
            result = await asyncio.wait_for(_collect(client, "m", list(range(5, 25)), params, kill_at), timeout=30)
            return result, time.monotonic() - t0

        (_, reasons, errors), seconds = running.run(scenario(), timeout_s=60)
        assert sorted(r.value for r in reasons) == ["error", "error"] and all(errors)
        assert seconds < 15
    finally:
        running.stop()


def test_a_request_decode_cannot_hold_is_refused_and_its_started_prefill_leaves_nothing(tiny_model, reference):
    """The router starts the prefill while decode reserves. When decode refuses (its blocks are taken),
    the prefill is aborted, the client is told to retry (Overloaded: HTTP 429), no KV stays behind on
    either pool, and the same prompt is served exactly once there is room."""
    import ray

    from cluster.client import Overloaded

    running = RunningCluster(cluster_config(tiny_model, prefill=1, decode=1, num_blocks=24))  # 384 tokens each
    try:
        client = running.client
        hog_prompt, big_prompt = list(range(10, 110)), list(range(200, 500))  # 7 blocks (and growing), 19 blocks
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

        async def scenario():
            hog = asyncio.create_task(_collect(client, "hog", hog_prompt, SamplingParams(max_tokens=150, temperature=0.0,
                                                                                        ignore_eos=True)))
            while not client.legs.get("hog#0") or not client.legs["hog#0"].output_ids:
                await asyncio.sleep(0.01)  # the hog holds decode blocks now
            with pytest.raises(Overloaded):
                await _collect(client, "big", big_prompt, params)
            await asyncio.wait_for(hog, timeout=60)
            return await asyncio.wait_for(_collect(client, "big-again", big_prompt, params), timeout=60)

        tokens, reasons, _ = running.run(scenario(), timeout_s=150)
        assert reasons == [FinishReason.LENGTH]
        assert tokens == reference.generate([big_prompt], params)[0].outputs[0].token_ids
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = [ray.get(v.handle.stats.remote()) for v in client.instances.values()]
            if all(s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_usage"] == 0.0 for s in stats):
                break
            time.sleep(0.2)
        assert all(s["kv_usage"] == 0.0 and s["num_running"] == 0 for s in stats), stats
        assert not client.legs
    finally:
        running.stop()
