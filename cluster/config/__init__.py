"""Every knob of the cluster, as frozen dataclasses, validated where they are made.

A component receives only its own sub-config. Each field has a default, a unit
suffix where it has a unit and a one-line comment; `__post_init__` raises
`ValueError` naming the field (`CacheConfig.block_size=0 must be ...`).
Environment variables are read here and nowhere else (`env_*` helpers).

  fields.py   ConfigError, the checks, from_dict (plain dicts -> nested configs), env_cache_dir
  engine.py   ModelConfig, CacheConfig, SchedulerConfig, RunnerConfig, ParallelConfig, DisaggConfig -> EngineConfig
  autoscale.py SloConfig, PoolLimits, AutoscaleConfig
  api.py      ApiConfig: bind address, keys, per-request ceilings, admission, drain deadline
  keys.py     ApiKeys, load_api_keys: the API's keys from the config, LLM_CLUSTER_API_KEYS / _ADMIN_KEYS and key files
  cluster.py  PoolConfig, RouterConfig, StoreConfig (+ the above) -> ClusterConfig; load_cluster_config (YAML)
"""
from cluster.config.api import ApiConfig
from cluster.config.autoscale import AutoscaleConfig, PoolLimits, SloConfig
from cluster.config.cluster import (ClusterConfig, PoolConfig, RouterConfig, StoreConfig,
                                    load_cluster_config)
from cluster.config.engine import (CacheConfig, DisaggConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig,
                                   SchedulerConfig)
from cluster.config.fields import ConfigError, env_cache_dir, from_dict
from cluster.config.keys import ApiKeys, key_files, load_api_keys

__all__ = ["AutoscaleConfig", "PoolLimits", "SloConfig", "ApiConfig", "ApiKeys", "CacheConfig", "ClusterConfig", "ConfigError", "DisaggConfig", "EngineConfig", "ModelConfig",
           "ParallelConfig", "PoolConfig", "RouterConfig", "RunnerConfig", "SchedulerConfig", "StoreConfig",
           "env_cache_dir", "from_dict", "key_files", "load_api_keys", "load_cluster_config"]
