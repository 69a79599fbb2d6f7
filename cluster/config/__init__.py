"""Every knob of the cluster, as frozen dataclasses, validated where they are made.

A component receives only its own sub-config. Each field has a default, a unit
suffix where it has a unit and a one-line comment; `__post_init__` raises
`ValueError` naming the field (`CacheConfig.block_size=0 must be ...`).
Environment variables are read here and nowhere else (`env_*` helpers).

  fields.py   ConfigError, the checks, from_dict (plain dicts -> nested configs), env_cache_dir
  engine.py   ModelConfig, CacheConfig, SchedulerConfig, RunnerConfig, ParallelConfig, DisaggConfig -> EngineConfig
  autoscale.py SloConfig, PoolLimits, AutoscaleConfig
  cluster.py  PoolConfig, RouterConfig, ApiConfig, StoreConfig (+ the above) -> ClusterConfig; load_cluster_config (YAML)
"""
from cluster.config.autoscale import AutoscaleConfig, PoolLimits, SloConfig
from cluster.config.cluster import (ApiConfig, ClusterConfig, PoolConfig, RouterConfig, StoreConfig,
                                    load_cluster_config)
from cluster.config.engine import (CacheConfig, DisaggConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig,
                                   SchedulerConfig)
from cluster.config.fields import ConfigError, env_cache_dir, from_dict

__all__ = ["AutoscaleConfig", "PoolLimits", "SloConfig", "ApiConfig", "CacheConfig", "ClusterConfig", "ConfigError", "DisaggConfig", "EngineConfig", "ModelConfig",
           "ParallelConfig", "PoolConfig", "RouterConfig", "RunnerConfig", "SchedulerConfig", "StoreConfig",
           "env_cache_dir", "from_dict", "load_cluster_config"]
