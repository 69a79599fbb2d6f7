"""Instances die mid-request: no request hangs, none is lost silently, the others are untouched."""
from __future__ import annotations

import asyncio
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
