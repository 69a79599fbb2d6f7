"""The disaggregated cluster end to end: real Ray actors, gloo KV links, the openai client."""
from __future__ import annotations

import concurrent.futures
import random
import subprocess
import time

import pytest

from cluster import LLM, SamplingParams
from tests.runtime.conftest import ADMIN_KEY, RunningCluster, cluster_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_model):
    running = RunningCluster(cluster_config(tiny_model, prefill=1, decode=2))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LLM(model=tiny_model, device="cpu", progress=False)


def _openai(cluster):
    import openai

    return openai.OpenAI(base_url=cluster.url, api_key="none", max_retries=0, timeout=60)


def test_everything_listens_on_loopback_only(cluster):
    import os

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ours = [line.split() for line in out.splitlines() if "ray" in line or f"pid={os.getpid()}," in line]
    assert ours, "found none of the cluster's sockets"
    bad = [f[3] for f in ours if not (f[3].startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")))]
    assert not bad, f"listening beyond loopback: {bad}"


def _links_ready(cluster, timeout_s: float = 30.0) -> set:
    """The prefill -> decode links the router holds, once every live pair has one (or the timeout)."""
    from cluster.types import Role

    client = cluster.client
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pairs = {(p.instance_id, d.instance_id) for p in client.pool(Role.PREFILL) for d in client.pool(Role.DECODE)}
        if pairs <= client.links.pairs:
            return pairs
        time.sleep(0.1)
    raise AssertionError(f"links {client.links.pairs} do not cover {pairs}")


def test_links_are_made_before_any_request(cluster):
    """A request never waits for a KV link's set-up: every prefill/decode pair is linked at start."""
    assert len(_links_ready(cluster)) == 2  # 1 prefill x 2 decode


def test_disaggregated_greedy_equals_single_engine(cluster, reference):
    client = _openai(cluster)
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 900) for _ in range(n)] for n in (3, 20, 77, 140)]
    expected = [o.outputs[0].token_ids for o in
                reference.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))]
    tok = reference.tokenizer
    for p, want in zip(prompts, expected):
        got = client.completions.create(model="llama", prompt=p, max_tokens=16, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == tok.decode(want)
        assert got.usage.completion_tokens == 16


def test_chat_stream_stop_and_n(cluster, reference):
    client = _openai(cluster)
    chunks = list(client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=12, temperature=0.0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    whole = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Say hi"}],
                                           max_tokens=12, temperature=0.0)
    assert whole.choices[0].message.content == text
    base = client.completions.create(model="llama", prompt="Numbers:", max_tokens=24, temperature=0.0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2 : len(base) // 2 + 2]
    cut = client.completions.create(model="llama", prompt="Numbers:", max_tokens=24, temperature=0.0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == base[: base.index(stop)] and cut.finish_reason == "stop"
    many = client.completions.create(model="llama", prompt="Once", max_tokens=8, temperature=1.0, n=3, seed=5,
                                     extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in many.choices)


def test_64_concurrent_requests_complete(cluster):
    client = _openai(cluster)

    def one(i):
        r = client.completions.create(model="llama", prompt=f"request {i}", max_tokens=8, temperature=0.0,
                                      extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(one, range(64), timeout=240))
    assert counts == [8] * 64


def test_added_decode_instance_takes_traffic(cluster):
    import httpx

    before = {v.instance_id for v in cluster.client.instances.values()}
    new_id = httpx.post(cluster.url.replace("/v1", "/admin/instances"), json={"role": "decode"}, timeout=120,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["instance_id"]
    assert new_id not in before
    assert any(new_id in pair for pair in _links_ready(cluster))  # linked as it joins, before its first request
    client = _openai(cluster)
    import ray

    steps_before = ray.get(cluster.client.instances[new_id].handle.stats.remote())["num_steps"]
    for i in range(6):
        client.completions.create(model="llama", prompt=f"new instance {i}", max_tokens=6, temperature=0.0)
    stats = ray.get(cluster.client.instances[new_id].handle.stats.remote())
    assert stats["num_steps"] > steps_before, "the new decode instance got no request"


def test_metrics_cover_pools_and_kv_transfer(cluster):
    import httpx

    client = _openai(cluster)
    client.completions.create(model="llama", prompt="metrics please", max_tokens=4)
    time.sleep(1.5)  # two heartbeats
    text = httpx.get(cluster.url.replace("/v1", "/metrics"), timeout=10).text
    samples = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines() if line and not line.startswith("#")}
    sent = sum(v for k, v in samples.items() if k.startswith("llm_cluster_kv_transfer_bytes_total{") and 'pool="prefill"' in k)
    assert sent > 0
    assert any(k.startswith("llm_cluster_kv_transfer_latency_seconds_count{") and v > 0 for k, v in samples.items())
    assert any(k.startswith("llm_cluster_pool_size{") and 'pool="decode"' in k and v >= 2 for k, v in samples.items())
    assert any(k.startswith("llm_cluster_time_to_first_token_seconds_count") and v > 0 for k, v in samples.items())


def test_client_disconnect_frees_kv_on_both_pools(cluster):
    import httpx
    import ray

    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{cluster.url}/completions",
                         json={"model": "llama", "prompt": "a long one", "max_tokens": 1500, "stream": True,
                               "ignore_eos": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 10:
                    break  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = [ray.get(v.handle.stats.remote()) for v in cluster.client.instances.values() if v.alive]
        if all(s["num_running"] == 0 and s["kv_usage"] == 0.0 for s in stats) and not cluster.client.legs:
            return
        time.sleep(0.2)
    raise AssertionError(f"KV not freed after the client left: {stats}")


def _serves_like_one_engine(config, reference, prompts) -> None:
    running = RunningCluster(config)
    try:
        client = _openai(running)
        for prompt in prompts:
            got = client.completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0.0,
                                            extra_body={"ignore_eos": True})
            want = reference.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
            assert got.choices[0].text == want.outputs[0].text
    finally:
        running.stop()


def test_mixed_pool_of_tp2_instances(tiny_model, reference):
    from dataclasses import replace

    from cluster.config import PoolConfig

    config = cluster_config(tiny_model, prefill=0, decode=0, mixed=1)
    _serves_like_one_engine(replace(config, mixed=PoolConfig(instances=1, tp=2, num_cpus_per_rank=0.25)), reference,
                            [list(range(3, 60))])


def test_prefill_tp1_decode_tp2_through_the_cluster(tiny_model, reference):
    """Pools of different tp: the decode instance's ranks each keep their own KV heads."""
    from dataclasses import replace

    from cluster.config import PoolConfig

    config = cluster_config(tiny_model, prefill=1, decode=1)
    _serves_like_one_engine(replace(config, decode=PoolConfig(instances=1, tp=2, num_cpus_per_rank=0.25)), reference,
                            [list(range(3, 60)), list(range(200, 233))])


def test_pipelined_decode_pool_through_the_cluster(tiny_model, reference):
    """A decode instance of two pipeline stages: rank 0 hands stage 1 its layers' KV."""
    from dataclasses import replace

    from cluster.config import PoolConfig

    config = cluster_config(tiny_model, prefill=1, decode=1)
    _serves_like_one_engine(replace(config, decode=PoolConfig(instances=1, pp=2, num_cpus_per_rank=0.25)), reference,
                            [list(range(3, 60)), list(range(200, 233))])


def test_prefill_tp2_decode_tp1_through_the_cluster(tiny_model, reference):
    from dataclasses import replace

    from cluster.config import PoolConfig

    config = cluster_config(tiny_model, prefill=1, decode=1)
    _serves_like_one_engine(replace(config, prefill=PoolConfig(instances=1, tp=2, num_cpus_per_rank=0.25)), reference,
                            [list(range(3, 60)), list(range(200, 233))])
