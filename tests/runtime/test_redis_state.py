"""The cluster keeps its state in a real redis-server: registry, prefix index, request journal."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest

from cluster.config import StoreConfig
from cluster.store import make_store
from tests.runtime.conftest import RunningCluster, cluster_config
from tests.store.conftest import redis_url  # noqa: F401  (the real redis-server fixture)

pytestmark = pytest.mark.slow


def test_cluster_state_lives_in_redis(tiny_model, redis_url):  # noqa: F811
    config = replace(cluster_config(tiny_model, prefill=1, decode=1), store=StoreConfig(redis_url=redis_url, namespace="e2e:"))
    running = RunningCluster(config)
    try:
        import openai

        client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
        prompt = list(range(1, 70))
        for _ in range(2):
            client.completions.create(model="llama", prompt=prompt, max_tokens=4, temperature=0.0)
        time.sleep(1.5)  # a heartbeat publishes loads and prefix blocks
        other = make_store(redis_url, namespace="e2e:")  # another router's view of the same Redis
        pools = sorted(info.pool.value for info, _ in other.list_instances())
        assert pools == ["decode", "prefill"]
        assert all(load is not None for _, load in other.list_instances())
        from cluster.engine.kv_cache import prefix_hashes

        hits = other.match_prefix(prefix_hashes(prompt, 16))
        assert hits and max(hits.values()) >= 4, hits  # the prompt's 4 full blocks are cached somewhere
        for info, _ in other.list_instances():  # finished requests leave the journal
            assert other.journal_on_instance(info.instance_id) == []
    finally:
        running.stop()
