"""The autoscaler end to end on Ray's real autoscaler (fake multi-node provider, fake_ray.py): engines on
CPU, each instance on a node of its own ("GPU": 1), the openai client on 127.0.0.1.

  scale out and in: a burst fills one instance's KV; the autoscaler adds an instance, whose pending
      placement group makes Ray start a node; after the burst it drains the instance and releases it,
      and Ray removes the idle node. Every request completes with the single engine's greedy text.
  role flip: a prompt-heavy load on one prefill and two decode instances with no GPU to spare: an
      idle decode instance is drained and rejoins as a prefill instance (weights kept).
"""
from __future__ import annotations

import concurrent.futures
import os
import time
from dataclasses import replace

import pytest

from cluster import LLM, SamplingParams
from cluster.config import AutoscaleConfig, PoolConfig, PoolLimits, SloConfig
from cluster.types import Role
from tests.autoscale.fake_ray import FakeAutoscalingRay
from tests.runtime.conftest import RunningCluster, cluster_config

pytestmark = pytest.mark.slow
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

PARAMS = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def tiny_model(checkpoint_dir):
    return checkpoint_dir("llama")


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LLM(model=tiny_model, device="cpu", progress=False)


@pytest.fixture
def fake_ray():
    import ray

    if ray.is_initialized():  # another module's local Ray: this test joins a cluster of its own
        ray.shutdown()
    cluster = FakeAutoscalingRay(head_cpus=2, max_gpu_nodes=3, idle_timeout_s=5.0)
    cluster.start()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


def _gpu_pool(instances: int) -> PoolConfig:
    return PoolConfig(instances=instances, num_cpus_per_rank=0.5, num_gpus_per_rank=1)


def _serve_all(running, prompts, max_tokens: int, concurrency: int) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=120)

    def one(prompt):
        stream = client.completions.create(model="llama", prompt=prompt, max_tokens=max_tokens, stream=True, **PARAMS)
        return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def _expected(reference, prompts, max_tokens: int) -> list[str]:
    outs = reference.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].text for o in outs]


def _wait(condition, timeout_s: float, what: str, running=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            history = running.autoscaler.status()["decisions"][:12] if running is not None else ""
            raise AssertionError(f"timed out waiting for {what}; last decisions: {history}")
        time.sleep(0.5)


def test_a_burst_adds_a_node_and_an_instance_and_both_go_after_it(tiny_model, reference, fake_ray):
    config = cluster_config(tiny_model, prefill=0, decode=0, mixed=1, num_blocks=48)  # 768 tokens of KV
    config = replace(config, ray_address=fake_ray.address, mixed=_gpu_pool(1),
                     slo=SloConfig(ttft_s=30.0, itl_s=2.0),  # generous: the KV is what the burst overloads
                     autoscale=AutoscaleConfig(enabled=True, interval_s=1.0, stable_window_s=4.0, min_samples=1,
                                               mixed=PoolLimits(1, 2), drain_timeout_s=30.0))
    running = RunningCluster(config)
    try:
        assert fake_ray.gpu_nodes() == 1  # the first instance's node
        prompts = [list(range(10 + i % 200, 50 + i % 200)) for i in range(256)]  # ~15 s on one CPU instance
        got = _serve_all(running, prompts, max_tokens=48, concurrency=16)
        assert got == _expected(reference, prompts, 48)  # every request, the single engine's greedy text
        history = running.autoscaler.status()["decisions"]
        ups = [d for d in history if d["direction"] == "up"]
        assert ups and ups[-1]["reason"] in ("kv", "itl", "ttft"), history
        _wait(lambda: any(d["actual"] == 2 for d in running.autoscaler.status()["decisions"]), 60,
              "the second instance serving", running)
        assert fake_ray.gpu_nodes() == 2 or any(d["direction"] == "down" for d in running.autoscaler.status()["decisions"])
        # after the burst: drained, released, and the node goes
        _wait(lambda: len(running.client.pool(Role.MIXED)) == 1 and not running.autoscaler.actuator.draining, 60,
              "the scale-in", running)
        _wait(lambda: fake_ray.gpu_nodes() == 1, 60, "Ray to remove the idle node")
        downs = [d for d in running.autoscaler.status()["decisions"] if d["direction"] == "down"]
        assert downs and downs[0]["reason"] in ("idle", "consolidate")
        assert running.cluster.metrics.scale_out_time.labels(running.client.info().name, "mixed")._sum.get() > 0
    finally:
        running.stop()


def test_a_prompt_heavy_load_flips_an_idle_decode_instance_to_prefill(tiny_model, reference, fake_ray):
    """No GPU to spare (max_gpus: the three instances'), prefill over its TTFT target, decode idle: the
    autoscaler drains a decode instance and it rejoins as a prefill instance, the same actor (its weights
    kept). Requests in flight through the flip complete with the single engine's text."""
    config = cluster_config(tiny_model, prefill=1, decode=2)
    config = replace(config, ray_address=fake_ray.address, prefill=_gpu_pool(1), decode=_gpu_pool(2),
                     slo=SloConfig(ttft_s=0.05, itl_s=2.0),  # prefill misses this under load; decode is idle
                     autoscale=AutoscaleConfig(enabled=True, interval_s=1.0, stable_window_s=30.0, min_samples=1,
                                               max_gpus=3, prefill=PoolLimits(1, 3), decode=PoolLimits(1, 3),
                                               drain_timeout_s=30.0))
    running = RunningCluster(config)
    try:
        decode_ids = {v.instance_id for v in running.client.pool(Role.DECODE)}
        prompts = [list(range(5 + i % 100, 205 + i % 100)) for i in range(160)]
        got = _serve_all(running, prompts, max_tokens=2, concurrency=16)
        assert got == _expected(reference, prompts, 2)
        _wait(lambda: len(running.client.pool(Role.PREFILL)) == 2 and not running.autoscaler.actuator.draining, 60,
              "the flipped instance serving as prefill", running)
        flipped = {v.instance_id for v in running.client.pool(Role.PREFILL)} & decode_ids
        assert len(flipped) == 1 and len(running.client.pool(Role.DECODE)) == 1
        flips = [d for d in running.autoscaler.status()["decisions"] if d["direction"] == "flip"]
        assert flips and flips[0]["pool"] == "decode" and flips[0]["flip_to"] == "prefill" and flips[0]["reason"] == "budget"
        assert fake_ray.gpu_nodes() == 3  # no node was added: the budget held
        # the flipped instance serves prefill now, and the cluster still answers like one engine
        more = [list(range(300 + i, 340 + i)) for i in range(24)]
        assert _serve_all(running, more, max_tokens=8, concurrency=8) == _expected(reference, more, 8)
    finally:
        running.stop()
