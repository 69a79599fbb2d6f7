"""The engine's knobs: one instance's model, cache, scheduler, runner, parallel layout and KV hand-over."""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config.fields import _positive_int, _require


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
    The overlap switches can be flipped at run time (`Executor.set_flags`), between steps.
    """

    tensor_parallel_size: int = 1  # ranks that split every layer's weights (tp)
    pipeline_parallel_size: int = 1  # stages the layers are partitioned into (pp)
    expert_parallel_size: int = 1  # ranks the experts of MoE layers are spread over (ep): 1 or tp
    overlap_tp_comm: bool = False  # split big steps in two micro-batches; one's all-reduce runs while the other computes
    overlap_ep_comm: bool = False  # the same two micro-batches hide MoE dispatch/combine behind expert compute
    overlap_min_tokens: int = 512  # steps with fewer tokens are not split (decode would read the weights twice)
    one_shot_all_reduce_max_bytes: int = 8 << 20  # CUDA: TP all-reduces up to this size go through peer memory, not NCCL; 0: off
    # a row-parallel layer's all-reduce and the residual add + RMSNorm after it as one kernel (CUDA, through
    # the one-shot all-reduce's peer memory: parallel/one_shot_norm.py); elsewhere the same deferral runs
    # as the two. Off until measured on two GPUs
    fuse_all_reduce_norm: bool = False
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
    # address this instance's link endpoint listens on; auto: its Ray node's address (a cluster of several
    # hosts or pods, where loopback reaches no peer)
    link_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        _require(self.transport in ("torchdist", "loopback"), "DisaggConfig", "transport", self.transport, "must be torchdist or loopback")
        _require(self.on_failure in ("recompute", "fail"), "DisaggConfig", "on_failure", self.on_failure, "must be recompute or fail")
        _require(self.transfer_timeout_s > 0, "DisaggConfig", "transfer_timeout_s", self.transfer_timeout_s, "must be > 0")
        _require(self.release_timeout_s > 0, "DisaggConfig", "release_timeout_s", self.release_timeout_s, "must be > 0")
        _require(isinstance(self.link_host, str) and bool(self.link_host), "DisaggConfig", "link_host", self.link_host,
                 "must be a host address or auto")


@dataclass(frozen=True)
class EngineConfig:
    """One engine instance: the model and how it is cached, scheduled and run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
