"""Config: YAML in, frozen dataclasses out; every error names the field."""
import pytest

from cluster.config import ClusterConfig, ConfigError, from_dict, load_cluster_config


def test_examples_load():
    for name in ("1p1d", "2p1d", "colocated", "1p1d-redis", "1p1d-tp2", "autoscale"):
        config = load_cluster_config(f"examples/{name}.yaml")
        assert config.disaggregated == (name != "colocated")
        assert config.autoscale.enabled == (name == "autoscale")  # off unless asked for
    tp2 = load_cluster_config("examples/1p1d-tp2.yaml")
    assert tp2.prefill.tp == tp2.decode.tp == 2 and tp2.engine.parallel.fuse_all_reduce_norm is False


def test_nested_keys_override_only_what_they_name():
    config = from_dict(ClusterConfig, {"decode": {"num_cpus_per_rank": 0.25}, "engine": {"cache": {"block_size": 32}}})
    assert config.decode.instances == 1 and config.decode.num_cpus_per_rank == 0.25
    assert config.engine.cache.block_size == 32 and config.engine.cache.enable_prefix_caching


@pytest.mark.parametrize("data,message", [
    ({"prefill": {"instancez": 2}}, "ClusterConfig.prefill: unknown field"),
    ({"prefill": {"tp": 0}}, "ClusterConfig.prefill: PoolConfig.tp=0"),
    ({"engine": {"cache": {"block_size": "x"}}}, "CacheConfig.block_size='x'"),
    ({"decode": {"pp": 0}}, "ClusterConfig.decode: PoolConfig.pp=0"),
    ({"prefill": {"instances": 0}}, "prefill.instances >= 1"),
    ({"api": {"port": 70000}}, "ApiConfig.port=70000"),
    ({"store": {"redis_url": "http://x"}}, "StoreConfig.redis_url"),
    ({"disagg": {"on_failure": "shrug"}}, "DisaggConfig.on_failure"),
    ({"autoscale": {"mode": "yolo"}}, "AutoscaleConfig.mode='yolo'"),
    ({"autoscale": {"decode": {"max_instances": 0}}}, "ClusterConfig.autoscale.decode: PoolLimits.max_instances=0"),
    ({"autoscale": {"upscale_headroom": 0.5, "downscale_margin": 0.6}}, "AutoscaleConfig.downscale_margin=0.6"),
    ({"decode": {"instances": 3}, "autoscale": {"enabled": True, "decode": {"max_instances": 2}}},
     "decode.instances=3 must not exceed autoscale.decode.max_instances=2"),
    ({"slo": {"ttft_s": 0}}, "SloConfig.ttft_s=0"),
    ({"engine": {"runner": {"async_scheduling": "no"}}}, "engine.runner.async_scheduling = 'no': must be true or false"),
    ({"engine": {"parallel": {"comm_high_priority": 1}}}, "engine.parallel.comm_high_priority = 1: must be true or false"),
    ({"engine": {"parallel": {"nccl_max_ctas": 100}}}, "ParallelConfig.nccl_max_ctas=100"),
    ({"engine": {"parallel": {"fuse_all_reduce_norm": "yes"}}}, "engine.parallel.fuse_all_reduce_norm = 'yes': must be true or false"),
    ({"engine": {"parallel": {"nccl_max_ctas": -1}}}, "ParallelConfig.nccl_max_ctas=-1"),
    ({"api": {"max_queue_wait_s": 0}}, "ApiConfig.max_queue_wait_s=0"),
    ({"engine": {"parallel": {"pipeline_parallel_size": 2, "pp_batches_in_flight": 1}}},
     "ParallelConfig.pp_batches_in_flight=1"),
    ({"api": {"max_queue_wait_s": "fast"}}, "ApiConfig.max_queue_wait_s='fast'"),
    ({"api": {"max_decode_step_ms": -5}}, "ApiConfig.max_decode_step_ms=-5"),
    ({"prefill": {"max_num_batched_tokens": 0}}, "ClusterConfig.prefill: PoolConfig.max_num_batched_tokens=0"),
    ({"api": {"keep_alive_s": 0}}, "ApiConfig.keep_alive_s=0"),
    ({"detached_instances": "yes"}, "ClusterConfig.detached_instances = 'yes': must be true or false"),
    ({"detached_instances": True}, "ClusterConfig.detached_instances=True needs ray_address"),
])
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        from_dict(ClusterConfig, data)


def test_detached_instances_are_off_unless_asked_for_and_live_in_the_store_namespace():
    assert ClusterConfig().detached_instances is False
    config = from_dict(ClusterConfig, {"detached_instances": True, "ray_address": "auto",
                                       "store": {"namespace": "llm_a:"}})
    assert config.detached_instances and config.ray_namespace == "llm-cluster/llm_a"
    assert ClusterConfig().ray_namespace != config.ray_namespace


def test_pools_may_have_any_layout():
    config = from_dict(ClusterConfig, {"prefill": {"tp": 2, "pp": 2}, "decode": {"tp": 4, "pp": 1}})
    assert (config.prefill.tp, config.prefill.pp, config.decode.tp) == (2, 2, 4)


def test_a_pool_may_set_its_own_step_budget():
    from cluster.runtime.launcher import _engine_config

    config = from_dict(ClusterConfig, {"prefill": {"max_num_batched_tokens": 2048, "tp": 2},
                                       "engine": {"scheduler": {"max_num_batched_tokens": 8192}}})
    prefill, decode = _engine_config(config.engine, config.prefill), _engine_config(config.engine, config.decode)
    assert prefill.scheduler.max_num_batched_tokens == 2048 and prefill.parallel.tensor_parallel_size == 2
    assert decode.scheduler.max_num_batched_tokens == 8192 and decode.scheduler == config.engine.scheduler


def test_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster_config(str(bad))
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_cluster_config(str(bad))
