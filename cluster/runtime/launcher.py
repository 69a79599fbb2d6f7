"""`llm-cluster up`'s cluster: Ray, the instance pools and the router client.

  (1) join a Ray cluster (`ray_address`) or start a local one bound to loopback;
  (2) start each pool's instances as Ray actors, one placement group per instance
      (its tp x pp ranks' CPUs/GPUs reserved together, on one host: the actor is the
      instance's rank 0 and spawns the other ranks itself);
  (3) build the ClusterClient (router + state store) and join every instance;
  (4) at run time (the autoscaler's actuator, `POST /admin/instances`): `launch` an instance (its
      placement group may wait for a node: a pending group is what makes Ray's autoscaler, or
      KubeRay's, add one), `join` it once placed and started, `release` it (actor and group go, so
      Ray's autoscaler can remove an idle node), or `switch_role` of a drained one (weights kept);
  (5) `stop` the actors and Ray.
The HTTP app is built above this module (cluster/app.py): it serves the OpenAI API over the
client, and `POST /admin/instances` calls `add_instance` to add an instance at run time.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
from dataclasses import dataclass

from cluster.config import ClusterConfig
from cluster.types import Role

SWITCH_WAIT_S = 10.0  # a drained instance's engine lets go of its aborted requests within a few steps

_ids = itertools.count()


def start_ray(config: ClusterConfig, num_cpus: int | None = None) -> bool:
    """Join or start Ray; True if this call started a local Ray (its caller shuts it down)."""
    if not config.ray_address:
        # a local Ray stays on the loopback interface; Ray reads this when it is first imported
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if config.ray_address:
        _join_ray(config.ray_address, config.ray_join_timeout_s)
        return False
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus or max(4, os.cpu_count() or 1),
             _temp_dir=tempfile.mkdtemp(prefix="llm-cluster-ray-"), log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    return True


def _join_ray(address: str, timeout_s: float) -> None:
    """ray.init(address), tried again for `timeout_s` while no Ray answers there yet."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            return
        except ConnectionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2.0)


def start_instance(config: ClusterConfig, role: Role):
    """One instance actor in its own placement group; returns (instance_id, handle)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.runtime.instance import InstanceActor

    pool = {Role.PREFILL: config.prefill, Role.DECODE: config.decode, Role.MIXED: config.mixed}[role]
    num_ranks = pool.tp * pool.pp
    # the actor is rank 0 and spawns the instance's other ranks on its host: one bundle holds them all
    bundle = {"CPU": pool.num_cpus_per_rank * num_ranks, **pool.ray_resources}
    if pool.num_gpus_per_rank:
        bundle["GPU"] = pool.num_gpus_per_rank * num_ranks
    group = placement_group([bundle], strategy="STRICT_PACK")
    instance_id = f"{role.value}-{next(_ids)}"
    # GPUs: every GPU of the host stays visible to the actor and its ranks bind the ones Ray assigned
    # (instance.local_device_ids): NCCL and CUDA IPC between processes want to see each other's GPU
    gpu_env = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}}
    actor = ray.remote(InstanceActor).options(
        name=f"llm-cluster-{instance_id}-{os.getpid()}",
        num_cpus=pool.num_cpus_per_rank * num_ranks,
        num_gpus=pool.num_gpus_per_rank * num_ranks,
        resources=dict(pool.ray_resources),
        max_concurrency=64,
        **(gpu_env if pool.num_gpus_per_rank else {}),
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True),
    ).remote(instance_id, role, _engine_config(config.engine, pool), config.disagg)
    return instance_id, actor, group


def _engine_config(base, pool):
    """The pool's layout decides the instance's ranks (its actor spawns ranks 1..tp*pp-1 itself), and
    its step budget, if it sets one, the scheduler's."""
    from dataclasses import replace

    parallel = replace(base.parallel, tensor_parallel_size=pool.tp, pipeline_parallel_size=pool.pp,
                       expert_parallel_size=pool.tp if base.parallel.expert_parallel_size > 1 else 1)
    scheduler = base.scheduler if pool.max_num_batched_tokens is None else replace(
        base.scheduler, max_num_batched_tokens=pool.max_num_batched_tokens)
    return replace(base, parallel=parallel, scheduler=scheduler)


def model_info(config: ClusterConfig):
    from cluster.client import ModelInfo
    from cluster.engine.engine import resolve_max_len
    from cluster.models.hf_config import load_arch_config
    from cluster.models.tokenizer import Tokenizer

    path = config.engine.model.path
    arch = load_arch_config(path)
    name = config.api.served_model_name or config.engine.model.served_name or os.path.basename(os.path.normpath(path))
    return ModelInfo(name, resolve_max_len(config.engine, arch), Tokenizer.from_dir(path), arch.vocab_size)


@dataclass
class Launch:
    """An instance asked of Ray: its placement group may still be pending."""

    instance_id: str
    role: Role
    actor: object
    group: object


class Cluster:
    """What `up` runs; also used by tests to start a cluster in-process."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.actors: dict[str, object] = {}
        self.groups: dict[str, object] = {}
        self.client = None
        self.metrics = None
        self.owns_ray = False

    async def start(self) -> None:
        from cluster.metrics import Metrics
        from cluster.runtime.cluster import ClusterClient
        from cluster.store import make_store

        self.owns_ray = start_ray(self.config)
        self.metrics = Metrics()
        store_config = self.config.store
        store = make_store(store_config.redis_url, namespace=store_config.namespace, timeout_s=store_config.timeout_s,
                           retry_interval_s=store_config.retry_interval_s)
        self.client = ClusterClient(self.config, model_info(self.config), store, self.metrics)
        roles = [(Role.PREFILL, self.config.prefill.instances), (Role.DECODE, self.config.decode.instances),
                 (Role.MIXED, self.config.mixed.instances)]
        await asyncio.gather(*(self.add_instance(role) for role, count in roles for _ in range(count)))
        await self.client.start()

    async def add_instance(self, role: Role) -> str:
        launch = self.launch(role)
        await self.join(launch)
        return launch.instance_id

    def launch(self, role: Role) -> Launch:
        instance_id, actor, group = start_instance(self.config, role)
        self.actors[instance_id] = actor
        self.groups[instance_id] = group
        return Launch(instance_id, role, actor, group)

    async def join(self, launch: Launch) -> dict[str, float]:
        """Once Ray has placed and started it, the instance takes traffic (its first `info` answers when
        its engine is built). Returns how long placement (a node, if Ray had to add one) and the start took."""
        t0 = time.monotonic()
        await launch.group.ready()
        t1 = time.monotonic()
        await self.client.add_instance(launch.instance_id, launch.role, launch.actor)
        return {"placement_s": t1 - t0, "start_s": time.monotonic() - t1}

    async def release(self, instance_id: str) -> None:
        """The instance leaves the router, its actor and placement group go."""
        import ray
        from ray.util.placement_group import remove_placement_group

        await self.client.remove_instance(instance_id)
        actor, group = self.actors.pop(instance_id, None), self.groups.pop(instance_id, None)
        try:
            if actor is not None:
                ray.kill(actor, no_restart=True)
            if group is not None:
                remove_placement_group(group)
        except Exception:  # already gone
            pass

    async def switch_role(self, instance_id: str, role: Role) -> None:
        """A drained instance rejoins with `role`: the same actor, engine and weights, a new role worker."""
        actor = self.actors[instance_id]
        await self.client.remove_instance(instance_id)
        deadline = time.monotonic() + SWITCH_WAIT_S
        while True:  # aborts of the requests moved off it reach its engine a step later
            try:
                await actor.set_role.remote(role, self.config.disagg)
                break
            except ValueError:  # not idle yet (Ray raises the actor's ValueError as one)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        await self.client.add_instance(instance_id, role, actor)

    def kill_instance(self, instance_id: str) -> None:
        import ray

        ray.kill(self.actors[instance_id], no_restart=True)

    async def stop(self) -> None:
        import ray

        if self.client is not None:
            await self.client.close()
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        for group in self.groups.values():  # give the reserved CPUs/GPUs back to a Ray that outlives us
            try:
                remove_placement_group(group)
            except Exception:
                pass
        if self.owns_ray:  # a Ray this cluster joined (ray_address, or a test's) outlives it
            ray.shutdown()
