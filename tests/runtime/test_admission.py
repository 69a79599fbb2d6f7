"""Admission on a real cluster (local Ray, 1P1D on CPU, the API through the `openai` package): past
what the prefill instance can start in time (api.max_queue_wait_s), or while the decode instance
steps slower than api.max_decode_step_ms, a request is refused at once with 429 and Retry-After,
and every request admitted completes."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from cluster.disagg.router import InstanceView
from cluster.runtime.admission import decode_step_ms, queue_wait_s
from cluster.types import Role
from tests.runtime.conftest import RunningCluster, cluster_config

pytestmark = pytest.mark.slow

LIMIT_S = 0.05  # far under the queue of a burst of 48 prompts of 1,500 tokens (seconds of CPU prefill)
NUM_BURST = 48


def test_a_burst_past_the_queue_wait_limit_gets_429_and_every_admitted_request_completes(tiny_model):
    import openai

    config = cluster_config(tiny_model, prefill=1, decode=1, num_blocks=8192)  # room for the whole burst on decode
    running = RunningCluster(replace(config, api=replace(config.api, max_queue_wait_s=LIMIT_S),
                                     router=replace(config.router, heartbeat_s=0.25)))
    try:
        client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
        prompt = [10 + i % 900 for i in range(1500)]
        # the prefill instance timed a full step of prompts before it served: admission has its rate at
        # once, before any queue (without it the limit stayed off until a heartbeat window had prompts
        # queued at every step, and a colocated H200 at 24 req/s never had one)
        prefill = next(v for v in running.client.instances.values() if v.role.value == "prefill")
        assert prefill.prefill_rate and prefill.prefill_rate > 100, prefill.prefill_rate
        first = client.completions.create(model="llama", prompt=prompt, max_tokens=4, temperature=0)
        assert first.usage.completion_tokens == 4  # an idle instance takes any prompt

        async def one(aclient, i: int):
            try:
                out = await aclient.completions.create(model="llama", prompt=[(t + i) % 1000 for t in prompt], max_tokens=8,
                                                       temperature=0, extra_body={"ignore_eos": True})
                return "done", out.usage.completion_tokens
            except openai.RateLimitError as exc:
                return "429", (exc.response.headers.get("retry-after"), exc.body)

        async def burst():
            aclient = openai.AsyncOpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=120)
            try:
                return await asyncio.gather(*(one(aclient, i) for i in range(NUM_BURST)))
            finally:
                await aclient.close()

        results = asyncio.run(burst())
        done = [r for kind, r in results if kind == "done"]
        refused = [r for kind, r in results if kind == "429"]
        assert len(done) + len(refused) == NUM_BURST  # nothing lost: each either completed or was told to retry
        assert done and refused, (len(done), len(refused))
        print(f"admitted {len(done)}, refused {len(refused)} at a prefill rate of {prefill.prefill_rate:.0f} tokens/s")
        assert all(tokens == 8 for tokens in done)
        for retry_after, body in refused:
            assert int(retry_after) >= 1
            assert body["code"] == "overloaded" and "max_queue_wait_s" in body["message"]
        # Prometheus counts them by the limit that refused them
        import httpx

        metrics = httpx.get(running.url.removesuffix("/v1") + "/metrics", timeout=10).text
        counted = [line for line in metrics.splitlines()
                   if line.startswith("llm_cluster_requests_rejected_total{") and 'reason="queue_wait"' in line]
        assert counted and float(counted[0].split()[-1]) == len(refused), counted
        # once the queue has drained, a request is admitted again
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                again = client.completions.create(model="llama", prompt=prompt, max_tokens=4, temperature=0)
                break
            except openai.RateLimitError:
                time.sleep(0.5)
        assert again.usage.completion_tokens == 4
    finally:
        running.stop()


def test_while_every_decode_instance_steps_slower_than_the_limit_a_request_gets_429(tiny_model):
    """api.max_decode_step_ms: while the one decode instance is busy (its heartbeat's mean step over a
    limit no CPU step can meet) a new request is refused with 429; once it is idle again, admitted."""
    import openai

    config = cluster_config(tiny_model, prefill=1, decode=1)
    running = RunningCluster(replace(config, api=replace(config.api, max_decode_step_ms=0.001)))
    try:
        client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
        decode = next(v for v in running.client.instances.values() if v.role.value == "decode")

        async def long_stream():
            aclient = openai.AsyncOpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=120)
            try:
                out = await aclient.completions.create(model="llama", prompt=list(range(10, 40)), max_tokens=400,
                                                       temperature=0, extra_body={"ignore_eos": True})
                return out.usage.completion_tokens
            finally:
                await aclient.close()

        stream = asyncio.run_coroutine_threadsafe(long_stream(), running.loop)
        deadline = time.monotonic() + 30
        while not decode.load.get("mean_step_ms") and time.monotonic() < deadline:
            time.sleep(0.05)  # a heartbeat that saw it decode
        assert decode.load.get("mean_step_ms"), "no decode step reached the router within 30 s"
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="llama", prompt=list(range(50, 60)), max_tokens=4, temperature=0)
        assert "max_decode_step_ms" in refused.value.body["message"]
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert stream.result(timeout=120) == 400  # the admitted stream is untouched
        deadline = time.monotonic() + 10
        while decode.load.get("mean_step_ms") and time.monotonic() < deadline:
            time.sleep(0.1)  # a heartbeat that saw it idle
        assert client.completions.create(model="llama", prompt=list(range(50, 60)), max_tokens=4,
                                         temperature=0).usage.completion_tokens == 4
    finally:
        running.stop()


def test_queue_wait_is_the_shortest_over_the_pool_and_unknown_while_an_instance_is_unmeasured():
    a, b = InstanceView("p0", Role.PREFILL, None), InstanceView("p1", Role.PREFILL, None)
    a.refresh({"num_queued_prefill_tokens": 4000, "prefill_tokens_per_s": 1000.0}, now_s=0.0)
    assert queue_wait_s([a, b], now_s=0.0) is None  # b may take the prompt: admission cannot refuse yet
    b.refresh({"num_queued_prefill_tokens": 1000, "prefill_tokens_per_s": 2000.0}, now_s=0.0)
    assert queue_wait_s([a, b], now_s=0.0) == 0.5
    b.alive = False
    assert queue_wait_s([a, b], now_s=0.0) == 4.0 and queue_wait_s([]) is None


def test_decode_step_is_the_fastest_over_the_pool_and_zero_for_an_idle_instance():
    a, b = InstanceView("d0", Role.DECODE, None), InstanceView("d1", Role.DECODE, None)
    a.refresh({"mean_step_ms": 30.0})
    b.refresh({"mean_step_ms": 45.0})
    assert decode_step_ms([a, b]) == 30.0
    b.refresh({"mean_step_ms": None})  # no step since its last heartbeat: idle, a stream starts at once
    assert decode_step_ms([a, b]) == 0.0 and decode_step_ms([]) is None


def test_the_decode_step_limit_refuses_a_share_that_rises_to_all_at_the_limit():
    """Not all-or-nothing: each heartbeat's step time would flip the next second between refusing every
    request and admitting a burst (one H200, colocated: whole seconds refused at 16 req/s)."""
    import random

    from cluster.client import Overloaded
    from cluster.config import ApiConfig
    from cluster.runtime.admission import admit, refusal_share

    assert refusal_share(20.0, 40.0) == 0.0 and refusal_share(30.0, 40.0) == 0.0
    assert refusal_share(35.0, 40.0) == 0.5 and refusal_share(40.0, 40.0) == 1.0 and refusal_share(90.0, 40.0) == 1.0
    decode = InstanceView("d0", Role.DECODE, None)
    api = ApiConfig(max_decode_step_ms=40.0)
    draw = random.Random(7).random
    for step_ms, low, high in ((25.0, 0, 0), (35.0, 400, 600), (45.0, 1000, 1000)):
        decode.refresh({"mean_step_ms": step_ms})
        refused = 0
        for _ in range(1000):
            try:
                admit(api, [], [decode], draw)
            except Overloaded as exc:
                assert "max_decode_step_ms" in str(exc)
                refused += 1
        assert low <= refused <= high, (step_ms, refused)
