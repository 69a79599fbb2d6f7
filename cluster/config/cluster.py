"""The cluster's knobs: its pools, router, API, state store, and the YAML file `llm-cluster up` reads."""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config.api import ApiConfig
from cluster.config.autoscale import AutoscaleConfig, SloConfig
from cluster.config.engine import DisaggConfig, EngineConfig
from cluster.config.fields import ConfigError, _is_positive_number, _positive_int, _require, from_dict


@dataclass(frozen=True)
class PoolConfig:
    """One pool of identical instances (prefill, decode, or mixed)."""

    instances: int = 0  # instances started at launch (the autoscaler may change it later)
    tp: int = 1  # tensor-parallel ranks per instance
    pp: int = 1  # pipeline stages per instance
    num_cpus_per_rank: float = 0.5  # Ray CPUs per rank actor (CPU deployments; fractions share cores)
    num_gpus_per_rank: float = 0.0  # Ray GPUs per rank actor (1 on GPU deployments)
    # this pool's token budget per step (None: engine.scheduler's). A prefill pool's prompt gets its
    # first token when its whole step ends, so a smaller budget answers sooner at the same throughput
    max_num_batched_tokens: int | None = None
    # custom Ray resources each instance asks for besides its CPUs and GPUs, e.g. {prefill_node: 1} to keep
    # the pool on nodes started with `--resources '{"prefill_node": N}'` (a KubeRay worker group of its own)
    ray_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(isinstance(self.instances, int) and self.instances >= 0, "PoolConfig", "instances", self.instances, "must be an integer >= 0")
        _require(isinstance(self.ray_resources, dict) and all(
            isinstance(k, str) and k and _is_positive_number(v) for k, v in self.ray_resources.items()),
            "PoolConfig", "ray_resources", self.ray_resources, "must map resource names to amounts > 0")
        if self.max_num_batched_tokens is not None:
            _positive_int("PoolConfig", "max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("PoolConfig", "tp", self.tp)
        _positive_int("PoolConfig", "pp", self.pp)
        _require(self.num_cpus_per_rank >= 0, "PoolConfig", "num_cpus_per_rank", self.num_cpus_per_rank, "must be >= 0")
        _require(self.num_gpus_per_rank >= 0, "PoolConfig", "num_gpus_per_rank", self.num_gpus_per_rank, "must be >= 0")


@dataclass(frozen=True)
class RouterConfig:
    """How requests are placed on instances."""

    policy: str = "load"  # load: queued prefill tokens + prefix overlap / free blocks + batch | round_robin
    prefix_weight_tokens: float = 1.0  # a prefix-cache hit of one token is worth this many queued tokens
    heartbeat_s: float = 1.0  # instances report load this often
    instance_ttl_s: float = 5.0  # an instance silent for this long is dead

    def __post_init__(self) -> None:
        _require(self.policy in ("load", "round_robin"), "RouterConfig", "policy", self.policy, "must be load or round_robin")
        _require(self.heartbeat_s > 0, "RouterConfig", "heartbeat_s", self.heartbeat_s, "must be > 0")
        _require(self.instance_ttl_s > self.heartbeat_s, "RouterConfig", "instance_ttl_s", self.instance_ttl_s, "must exceed heartbeat_s")


@dataclass(frozen=True)
class StoreConfig:
    """Cluster state: in memory by default, Redis when redis_url is set."""

    redis_url: str | None = None  # redis://host:port/db; None: in-memory (one process)
    namespace: str = "llm_cluster:"
    # every Redis call gives up after this (connect and socket timeouts; one immediate retry): an
    # unreachable Redis costs a call at most about twice this, never a hang
    timeout_s: float = 0.5
    # after a failed call the store is left alone this long (calls fail at once, serving goes on from
    # what the router holds), then tried again; the heartbeat re-registers and republishes when it answers
    retry_interval_s: float = 1.0

    def __post_init__(self) -> None:
        _require(self.redis_url is None or self.redis_url.startswith(("redis://", "rediss://", "memory://")),
                 "StoreConfig", "redis_url", self.redis_url, "must be redis://host:port/db (or unset)")
        for name in ("timeout_s", "retry_interval_s"):
            _require(_is_positive_number(getattr(self, name)), "StoreConfig", name, getattr(self, name), "must be > 0 seconds")


@dataclass(frozen=True)
class ClusterConfig:
    """Everything `llm-cluster up` starts."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    prefill: PoolConfig = field(default_factory=lambda: PoolConfig(instances=1))
    decode: PoolConfig = field(default_factory=lambda: PoolConfig(instances=1))
    mixed: PoolConfig = field(default_factory=PoolConfig)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    ray_address: str | None = None  # None: start a local Ray on loopback; "auto" or an address: join it
    # joining ray_address: keep trying this long while its head is still starting (the API in a container
    # beside the Ray head: helm/llm-cluster); 0: one try
    ray_join_timeout_s: float = 0.0
    # instances outlive the API process: detached actors and placement groups named in the Ray namespace
    # `ray_namespace`, which the next API process adopts (runtime/adopt.py); a clean stop still ends them
    detached_instances: bool = False

    def __post_init__(self) -> None:
        _require(isinstance(self.detached_instances, bool), "ClusterConfig", "detached_instances",
                 self.detached_instances, "must be true or false")
        _require(not self.detached_instances or bool(self.ray_address), "ClusterConfig", "detached_instances",
                 self.detached_instances, "needs ray_address: a Ray that `up` starts itself ends with it")
        _require(isinstance(self.ray_join_timeout_s, (int, float)) and not isinstance(self.ray_join_timeout_s, bool)
                 and self.ray_join_timeout_s >= 0, "ClusterConfig", "ray_join_timeout_s", self.ray_join_timeout_s,
                 "must be >= 0 seconds")
        disagg = self.prefill.instances > 0 or self.decode.instances > 0
        if disagg and (self.prefill.instances == 0 or self.decode.instances == 0):
            raise ConfigError("ClusterConfig: a disaggregated deployment needs prefill.instances >= 1 and decode.instances >= 1")
        if not disagg and self.mixed.instances == 0:
            raise ConfigError("ClusterConfig: no instances: set mixed.instances, or prefill and decode instances")
        if self.autoscale.enabled:
            used = (("prefill", self.prefill), ("decode", self.decode)) if disagg else (("mixed", self.mixed),)
            for name, pool in used:
                limits = getattr(self.autoscale, name)
                if limits.min_instances < 1:
                    raise ConfigError(f"ClusterConfig: autoscale.{name}.min_instances must be >= 1 for a pool in use")
                # below the minimum is fine: the autoscaler's first decision brings the pool up to it (as a
                # Kubernetes HPA does), e.g. onto nodes that join after the cluster started
                if pool.instances > limits.max_instances:
                    raise ConfigError(f"ClusterConfig: {name}.instances={pool.instances} must not exceed autoscale."
                                      f"{name}.max_instances={limits.max_instances}")
        # the KV hand-over gathers a prefill instance's shards (heads over tp, layers over pp) to its
        # rank 0 and scatters them from a decode instance's rank 0 (engine/kv_handover.py): the pools
        # may have any tp x pp each

    @property
    def disaggregated(self) -> bool:
        return self.prefill.instances > 0

    @property
    def ray_namespace(self) -> str:
        """The Ray namespace of this cluster's detached instances: its store's namespace, so two clusters
        on one Ray keep apart exactly when their state in a shared Redis does."""
        return "llm-cluster/" + (self.store.namespace.rstrip(":") or "default")


def load_cluster_config(path: str | None, overrides: dict | None = None) -> ClusterConfig:
    """Read YAML (unknown keys and bad values are errors naming the field)."""
    data: dict = {}
    if path:
        import yaml

        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for key, value in (overrides or {}).items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return from_dict(ClusterConfig, data)
