"""Every knob of the cluster, as frozen dataclasses, validated where they are made.

A component receives only its own sub-config. Each field has a default, a unit
suffix where it has a unit and a one-line comment; `__post_init__` raises
`ValueError` naming the field (`CacheConfig.block_size=0 must be ...`).
Environment variables are read here and nowhere else (`env_*` helpers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A config value is wrong; the message names the field."""


def _require(ok: bool, owner: str, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{owner}.{name}={value!r} {rule}")


def _positive_int(owner: str, name: str, value: object) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, owner, name, value, "must be an integer >= 1")


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint an instance serves and in what precision."""

    path: str = ""  # HF checkpoint directory (config.json, *.safetensors, tokenizer.json)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)
    max_model_len: int | None = None  # context cap; None: the checkpoint's max_position_embeddings
    served_name: str | None = None  # name in /v1/models; None: the directory's name
    seed: int = 0  # seed for anything random the engine does outside per-request sampling

    def __post_init__(self) -> None:
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "ModelConfig", "dtype", self.dtype, "must be one of auto, float32, bfloat16, float16")
        if self.max_model_len is not None:
            _positive_int("ModelConfig", "max_model_len", self.max_model_len)


@dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is sized and reused."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # fixed block count; None: derive from the memory budget
    memory_budget_bytes: int | None = None  # KV budget; None: gpu_memory_fraction of free memory (GPU) or 1 GiB (CPU)
    gpu_memory_fraction: float = 0.85  # share of the device memory left after weights that KV may take
    enable_prefix_caching: bool = True  # reuse full blocks whose token chain hashes match

    def __post_init__(self) -> None:
        _positive_int("CacheConfig", "block_size", self.block_size)
        if self.num_blocks is not None:
            _positive_int("CacheConfig", "num_blocks", self.num_blocks)
        if self.memory_budget_bytes is not None:
            _positive_int("CacheConfig", "memory_budget_bytes", self.memory_budget_bytes)
        _require(0 < self.gpu_memory_fraction <= 1, "CacheConfig", "gpu_memory_fraction", self.gpu_memory_fraction, "must be in (0, 1]")


@dataclass(frozen=True)
class SchedulerConfig:
    """What runs in each step."""

    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 8192  # token budget of one step (decodes + prefill chunks)
    enable_chunked_prefill: bool = True  # split long prompts across steps under the budget
    max_waiting: int = 4096  # queue bound; beyond it add_request refuses (backpressure)

    def __post_init__(self) -> None:
        _positive_int("SchedulerConfig", "max_num_seqs", self.max_num_seqs)
        _positive_int("SchedulerConfig", "max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("SchedulerConfig", "max_waiting", self.max_waiting)


@dataclass(frozen=True)
class RunnerConfig:
    """How the model runs on the device."""

    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # auto | torch_ref | triton
    enable_cuda_graphs: bool = True  # capture decode batches on CUDA
    cuda_graph_max_batch: int = 256  # largest decode batch captured
    device_ids: tuple[int, ...] = ()  # CUDA device of each local rank (rank r: device_ids[r]); empty: rank r on device r
    # schedule and launch step N+1 before step N's tokens reach the host (mixed and decode roles):
    # the host's work hides behind the device's
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        _require(self.device in ("auto", "cpu", "cuda"), "RunnerConfig", "device", self.device, "must be auto, cpu or cuda")
        _require(all(isinstance(i, int) and i >= 0 for i in self.device_ids), "RunnerConfig", "device_ids",
                 self.device_ids, "must be device indices >= 0")
        _require(self.attention_backend in ("auto", "torch_ref", "triton"), "RunnerConfig", "attention_backend", self.attention_backend, "must be auto, torch_ref or triton")
        _positive_int("RunnerConfig", "cuda_graph_max_batch", self.cuda_graph_max_batch)


@dataclass(frozen=True)
class ParallelConfig:
    """How one instance spreads over devices: `tp x pp` ranks on one host, experts over the tp ranks.

    World rank w = stage * tp + tp_rank; rank 0 is the driver process (it schedules).
    The overlap switches can be flipped per step at run time (`Executor.set_overlap`)
    so a benchmark measures both settings on one instance.
    """

    tensor_parallel_size: int = 1  # ranks that split every layer's weights (tp)
    pipeline_parallel_size: int = 1  # stages the layers are partitioned into (pp)
    expert_parallel_size: int = 1  # ranks the experts of MoE layers are spread over (ep): 1 or tp
    overlap_tp_comm: bool = False  # split big steps in two micro-batches; one's all-reduce runs while the other computes
    overlap_ep_comm: bool = False  # the same two micro-batches hide MoE dispatch/combine behind expert compute
    overlap_min_tokens: int = 512  # steps with fewer tokens are not split (decode would read the weights twice)
    one_shot_all_reduce_max_bytes: int = 8 << 20  # CUDA: TP all-reduces up to this size go through peer memory, not NCCL; 0: off
    # NCCL's streams at high priority: a collective's blocks are scheduled as soon as the compute
    # stream's kernels free SMs (overlap), not after every block already queued
    comm_high_priority: bool = True
    # NCCL: at most this many thread blocks (SMs) per collective of the instance's groups, so an
    # overlapped all-reduce leaves the GEMMs beside it most of the SMs; 0: NCCL's own choice
    nccl_max_ctas: int = 0
    async_pp_send: bool = True  # a stage sends activations without waiting for the send before computing on
    num_pp_microbatches: int = 0  # micro-batches per step in flight through the stages; 0: pipeline_parallel_size
    # with async scheduling, the decode batches that take turns in the stages: one more than the stages
    # gives stage 0 a batch to compute while it waits for the last stage's rows; 0: pipeline_parallel_size
    pp_batches_in_flight: int = 0
    # layers per stage: balanced (stage 0, which also reads the LM head, takes that many layers' worth
    # fewer), even, or explicit counts "15,17" (parallel/pipeline.py: stage_ranges)
    pp_layer_partition: str = "balanced"
    master_addr: str = "127.0.0.1"  # where the driver's rendezvous store listens and gloo binds (ranks share a host)
    master_port: int = 0  # the store's port; 0: a free port picked at start
    collective_timeout_s: float = 60.0  # a device collective slower than this fails the instance
    liveness_poll_s: float = 0.2  # how often the driver checks that every rank's process is alive

    def __post_init__(self) -> None:
        owner = "ParallelConfig"
        _positive_int(owner, "tensor_parallel_size", self.tensor_parallel_size)
        _positive_int(owner, "pipeline_parallel_size", self.pipeline_parallel_size)
        _positive_int(owner, "expert_parallel_size", self.expert_parallel_size)
        _require(self.expert_parallel_size in (1, self.tensor_parallel_size), owner, "expert_parallel_size",
                 self.expert_parallel_size, f"must be 1 or tensor_parallel_size ({self.tensor_parallel_size}): "
                 "experts are spread over the tensor-parallel ranks")
        _positive_int(owner, "overlap_min_tokens", self.overlap_min_tokens)
        _require(isinstance(self.one_shot_all_reduce_max_bytes, int) and self.one_shot_all_reduce_max_bytes >= 0, owner,
                 "one_shot_all_reduce_max_bytes", self.one_shot_all_reduce_max_bytes, "must be an integer >= 0 (0: off)")
        _require(isinstance(self.pp_layer_partition, str) and bool(self.pp_layer_partition.strip()), owner,
                 "pp_layer_partition", self.pp_layer_partition, "must be balanced, even, or layer counts such as 15,17")
        _require(isinstance(self.nccl_max_ctas, int) and not isinstance(self.nccl_max_ctas, bool)
                 and 0 <= self.nccl_max_ctas <= 64, owner, "nccl_max_ctas", self.nccl_max_ctas,
                 "must be an integer from 0 (NCCL's choice) to 64")
        _require(isinstance(self.num_pp_microbatches, int) and self.num_pp_microbatches >= 0, owner,
                 "num_pp_microbatches", self.num_pp_microbatches, "must be an integer >= 0 (0: one per stage)")
        _require(isinstance(self.pp_batches_in_flight, int) and not isinstance(self.pp_batches_in_flight, bool)
                 and (self.pp_batches_in_flight == 0 or self.pp_batches_in_flight >= self.pipeline_parallel_size), owner,
                 "pp_batches_in_flight", self.pp_batches_in_flight,
                 f"must be 0 (one per stage) or an integer >= pipeline_parallel_size ({self.pipeline_parallel_size})")
        _require(isinstance(self.master_port, int) and 0 <= self.master_port < 65536, owner, "master_port",
                 self.master_port, "must be a port number (0: pick a free one)")
        _require(bool(self.master_addr), owner, "master_addr", self.master_addr, "must be a host address")
        _require(self.collective_timeout_s > 0, owner, "collective_timeout_s", self.collective_timeout_s, "must be > 0")
        _require(self.liveness_poll_s > 0, owner, "liveness_poll_s", self.liveness_poll_s, "must be > 0")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def num_microbatches(self) -> int:
        return self.num_pp_microbatches or self.pipeline_parallel_size

    def check_model(self, *, num_heads: int, num_kv_heads: int, num_layers: int, intermediate_size: int,
                    num_experts: int = 0, moe_intermediate_size: int = 0, shared_expert_intermediate_size: int = 0) -> None:
        """Raise ConfigError, naming the field, if the model cannot be split this way."""
        tp, pp, owner = self.tensor_parallel_size, self.pipeline_parallel_size, "ParallelConfig"
        _require(num_heads % tp == 0, owner, "tensor_parallel_size", tp, f"must divide num_attention_heads={num_heads}")
        _require(num_kv_heads % tp == 0 or tp % num_kv_heads == 0, owner, "tensor_parallel_size", tp,
                 f"must divide num_key_value_heads={num_kv_heads} or be a multiple of it (heads replicated)")
        _require(num_layers >= pp, owner, "pipeline_parallel_size", pp, f"must be at most num_hidden_layers={num_layers}")
        partition = self.pp_layer_partition
        if partition == "even":
            _require(num_layers % pp == 0, owner, "pipeline_parallel_size", pp,
                     f"must divide num_hidden_layers={num_layers} (pp_layer_partition=even)")
        elif partition != "balanced":
            counts = partition.split(",")
            _require(len(counts) == pp and all(c.strip().isdigit() and int(c) >= 1 for c in counts)
                     and sum(int(c) for c in counts) == num_layers, owner, "pp_layer_partition", partition,
                     f"must be balanced, even, or {pp} layer counts >= 1 that add up to num_hidden_layers={num_layers}")
        _require(intermediate_size % tp == 0, owner, "tensor_parallel_size", tp, f"must divide intermediate_size={intermediate_size}")
        if num_experts and self.expert_parallel_size > 1:
            ep = self.expert_parallel_size
            _require(num_experts % ep == 0, owner, "expert_parallel_size", ep, f"must divide num_experts={num_experts}")
        elif num_experts:
            _require(moe_intermediate_size % tp == 0, owner, "tensor_parallel_size", tp,
                     f"must divide moe_intermediate_size={moe_intermediate_size} (experts split by tensor parallelism)")
        if shared_expert_intermediate_size and self.expert_parallel_size == 1:
            _require(shared_expert_intermediate_size % tp == 0, owner, "tensor_parallel_size", tp,
                     f"must divide shared_expert_intermediate_size={shared_expert_intermediate_size}")


@dataclass(frozen=True)
class DisaggConfig:
    """How KV moves from prefill to decode instances."""

    transport: str = "torchdist"  # torchdist (NCCL on GPU, gloo on CPU) | loopback (one process, tests)
    transfer_timeout_s: float = 10.0  # a transfer not done by then FAILS (never a hang)
    on_failure: str = "recompute"  # recompute: the decode instance computes the prompt itself | fail: error to the client
    release_timeout_s: float = 30.0  # the prefill side frees a request's KV by then even without confirmation
    link_host: str = "127.0.0.1"  # address this instance's link endpoint listens on

    def __post_init__(self) -> None:
        _require(self.transport in ("torchdist", "loopback"), "DisaggConfig", "transport", self.transport, "must be torchdist or loopback")
        _require(self.on_failure in ("recompute", "fail"), "DisaggConfig", "on_failure", self.on_failure, "must be recompute or fail")
        _require(self.transfer_timeout_s > 0, "DisaggConfig", "transfer_timeout_s", self.transfer_timeout_s, "must be > 0")
        _require(self.release_timeout_s > 0, "DisaggConfig", "release_timeout_s", self.release_timeout_s, "must be > 0")


@dataclass(frozen=True)
class EngineConfig:
    """One engine instance: the model and how it is cached, scheduled and run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def from_dict(cls, data: dict | None, owner: str | None = None, base=None):
    """Build a (nested) config dataclass from plain dicts, naming unknown keys.

    A nested mapping overrides only the keys it names: `prefill: {tp: 2}` keeps the
    prefill pool's other defaults (its one instance), it does not reset them.
    """
    owner = owner or cls.__name__
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{owner}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
    hints = _hints(cls)
    for name, value in data.items():
        sub = _nested_config_type(cls, known[name])
        if sub and isinstance(value, dict):
            current = kwargs.get(name, _field_default(known[name]))
            value = from_dict(sub, value, f"{owner}.{name}", current)
        elif hints.get(name) is bool and not isinstance(value, bool):  # YAML `no` is a bool, "no" is not
            raise ConfigError(f"{owner}.{name} = {value!r}: must be true or false")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{owner}: {exc}") from None
    except ConfigError as exc:  # name the path in the file, not just the class (prefill.tp, not PoolConfig.tp)
        raise ConfigError(f"{owner}: {exc}" if owner != cls.__name__ else str(exc)) from None


def _field_default(f):
    from dataclasses import MISSING

    return f.default_factory() if f.default_factory is not MISSING else None


def _hints(cls) -> dict:
    import typing

    return typing.get_type_hints(cls)


def _nested_config_type(cls, f):
    hint = _hints(cls).get(f.name)
    return hint if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__") else None


def env_cache_dir() -> str:
    """Where made models and other cached artefacts live (LLM_CLUSTER_CACHE)."""
    return os.environ.get("LLM_CLUSTER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llm-cluster"))


@dataclass(frozen=True)
class PoolConfig:
    """One pool of identical instances (prefill, decode, or mixed)."""

    instances: int = 0  # instances started at launch (the autoscaler may change it later)
    tp: int = 1  # tensor-parallel ranks per instance
    pp: int = 1  # pipeline stages per instance
    num_cpus_per_rank: float = 0.5  # Ray CPUs per rank actor (CPU deployments; fractions share cores)
    num_gpus_per_rank: float = 0.0  # Ray GPUs per rank actor (1 on GPU deployments)
    # this pool's token budget per step (None: engine.scheduler's). A prefill pool's prompt gets its
    # first token when its whole step ends: at 8,192 tokens a step of four 2k prompts took 0.21 s on an
    # H200, at 2,048 one prompt's takes a quarter of that, and the GEMMs are as busy at either size
    max_num_batched_tokens: int | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.instances, int) and self.instances >= 0, "PoolConfig", "instances", self.instances, "must be an integer >= 0")
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
class ApiConfig:
    """The OpenAI-compatible HTTP server."""

    host: str = "127.0.0.1"  # bind address (0.0.0.0 only inside a container/pod)
    port: int = 8000
    max_pending: int = 256  # requests admitted at once; beyond it 429 with Retry-After
    # a request that would wait longer than this before its prefill starts (the prompt tokens queued on
    # the least loaded prefill or mixed instance, over that instance's measured prefill rate) gets 429
    # with Retry-After at once, instead of a TTFT past its SLO; set it to the TTFT target less a
    # prompt's prefill time. None: max_pending alone bounds admission
    max_queue_wait_s: float | None = None
    # a request is refused (429) while every decode (or mixed) instance's mean step time since its last
    # heartbeat exceeds this: one more stream would slow them all past their TPOT target (set it a
    # little under that target). None: no limit
    max_decode_step_ms: float | None = None
    served_model_name: str | None = None  # /v1/models id; None: the checkpoint directory's name
    # how long an idle client connection stays open (uvicorn's default is 5 s): a client that pools
    # connections may send on one just as the server closes it, and gets "Server disconnected" with no
    # response (once in 706 requests on 2xH200); longer than clients keep idle ones makes that rare
    keep_alive_s: float = 75.0

    def __post_init__(self) -> None:
        _require(isinstance(self.port, int) and 0 <= self.port < 65536, "ApiConfig", "port", self.port, "must be a port number")
        _require(_is_positive_number(self.keep_alive_s), "ApiConfig", "keep_alive_s", self.keep_alive_s, "must be > 0 seconds")
        _positive_int("ApiConfig", "max_pending", self.max_pending)
        for name, unit in (("max_queue_wait_s", "seconds"), ("max_decode_step_ms", "milliseconds")):
            limit = getattr(self, name)
            _require(limit is None or _is_positive_number(limit),
                     "ApiConfig", name, limit, f"must be a number of {unit} > 0 (or unset)")


@dataclass(frozen=True)
class StoreConfig:
    """Cluster state: in memory by default, Redis when redis_url is set."""

    redis_url: str | None = None  # redis://host:port/db; None: in-memory (one process)
    namespace: str = "llm_cluster:"

    def __post_init__(self) -> None:
        _require(self.redis_url is None or self.redis_url.startswith(("redis://", "rediss://", "memory://")),
                 "StoreConfig", "redis_url", self.redis_url, "must be redis://host:port/db (or unset)")


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
    ray_address: str | None = None  # None: start a local Ray on loopback; "auto" or an address: join it

    def __post_init__(self) -> None:
        disagg = self.prefill.instances > 0 or self.decode.instances > 0
        if disagg and (self.prefill.instances == 0 or self.decode.instances == 0):
            raise ConfigError("ClusterConfig: a disaggregated deployment needs prefill.instances >= 1 and decode.instances >= 1")
        if not disagg and self.mixed.instances == 0:
            raise ConfigError("ClusterConfig: no instances: set mixed.instances, or prefill and decode instances")
        # the KV hand-over gathers a prefill instance's shards (heads over tp, layers over pp) to its
        # rank 0 and scatters them from a decode instance's rank 0 (engine/kv_handover.py): the pools
        # may have any tp x pp each

    @property
    def disaggregated(self) -> bool:
        return self.prefill.instances > 0


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
