"""`llm-cluster up`'s cluster: Ray, the instance pools and the router client.

  (1) join a Ray cluster (`ray_address`) or start a local one bound to loopback;
  (2) start each pool's instances as Ray actors, one placement group per instance
      (its tp x pp ranks' CPUs/GPUs reserved together, on one host: the actor is the
      instance's rank 0 and spawns the other ranks itself);
  (3) build the ClusterClient (router + state store); with `detached_instances`, adopt first the
      instances a previous API process left serving (runtime/adopt.py); then launch what each pool
      still misses and join every instance;
  (4) at run time (the autoscaler's actuator, `POST /admin/instances`): `launch` an instance (its
      placement group may wait for a node: a pending group is what makes Ray's autoscaler, or
      KubeRay's, add one), `join` it once placed and started, `release` it (actor and group go, so
      Ray's autoscaler can remove an idle node), or `switch_role` of a drained one (weights kept);
  (5) `stop` the actors (detached ones too) and Ray.
The HTTP app is built above this module (cluster/app.py): it serves the OpenAI API over the
client, and `POST /admin/instances` calls `add_instance` to add an instance at run time.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass

from cluster.config import ClusterConfig
from cluster.runtime import adopt
from cluster.types import Role

log = logging.getLogger(__name__)
SWITCH_WAIT_S = 10.0  # a drained instance's engine lets go of its aborted requests within a few steps

_ids = itertools.count()

# what a Ray node that runs instances has in its environment (the local Ray started here; the Helm
# chart's pods): one OpenMP thread a worker, the instance's module imported as a worker starts, and
# every GPU of the host visible to each actor (instance._visible_gpus)
RAYLET_ENV = {"OMP_NUM_THREADS": "1", "RAY_preload_python_modules": "cluster.runtime.instance",
              "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


def start_ray(config: ClusterConfig, num_cpus: int | None = None) -> bool:
    """Join or start Ray; True if this call started a local Ray (its caller shuts it down)."""
    if not config.ray_address:
        # a local Ray stays on the loopback interface; Ray reads this when it is first imported
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    namespace = config.ray_namespace if config.detached_instances else None  # None: an anonymous one, as before
    if ray.is_initialized():
        if namespace and ray.get_runtime_context().namespace != namespace:
            raise ValueError(f"detached_instances: this process's Ray driver is not in the cluster's namespace {namespace!r}")
        return False
    if config.ray_address:
        _join_ray(config.ray_address, config.ray_join_timeout_s, namespace)
        return False
    # the workers' one OpenMP thread comes from the raylet's environment, not a runtime_env
    # (a runtime_env gets no worker Ray started ahead: each instance waited for a process of its own), and
    # every worker imports the instance's module (torch with it) as it starts, so a worker Ray started
    # ahead takes a new instance without a second's imports
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../cluster
    path = os.pathsep.join(p for p in (os.path.dirname(package), os.environ.get("PYTHONPATH")) if p)
    env = {**RAYLET_ENV, "PYTHONPATH": path}  # a worker Ray starts ahead imports before it knows the job's paths
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus or max(4, os.cpu_count() or 1),
                 _temp_dir=tempfile.mkdtemp(prefix="llm-cluster-ray-"), log_to_driver=False)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    return True


def _join_ray(address: str, timeout_s: float, namespace: str | None) -> None:
    """ray.init(address), tried again for `timeout_s` while no Ray answers there yet."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=False)
            return
        except ConnectionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2.0)


def new_instance_id(role: Role, detached: bool) -> str:
    """`<role>-<n>`, counted in this process; detached, `<role>-<random hex>`: an API process that adopts
    instances a previous one launched must not give a new one an id they already have."""
    return f"{role.value}-{secrets.token_hex(4) if detached else next(_ids)}"


def start_instance(config: ClusterConfig, role: Role):
    """One instance actor in its own placement group; returns (instance_id, actor, group). Detached
    (`detached_instances`): both outlive this process, named in its Ray namespace (runtime/adopt.py)."""
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
    detached = config.detached_instances
    instance_id = new_instance_id(role, detached)
    name = adopt.detached_name(instance_id) if detached else f"llm-cluster-{instance_id}-{os.getpid()}"
    lifetime = {"lifetime": "detached"} if detached else {}  # detached: Ray's GCS owns it, not this driver
    group = placement_group([bundle], strategy="STRICT_PACK", **({"name": name, **lifetime} if detached else {}))
    # no runtime_env: the actor then takes a Python worker Ray started ahead (the node's environment,
    # RAYLET_ENV, keeps every GPU of the host visible to it and its ranks, as NCCL and CUDA IPC want)
    actor = ray.remote(InstanceActor).options(
        name=name,
        **lifetime,
        num_cpus=pool.num_cpus_per_rank * num_ranks,
        num_gpus=pool.num_gpus_per_rank * num_ranks,
        resources=dict(pool.ray_resources),
        max_concurrency=64,
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
        self.metrics.set_slo(self.client.info().name, self.config.slo.ttft_s, self.config.slo.itl_s)
        self.client.on_instance_dead = self._reap
        adopted = await self.adopt() if self.config.detached_instances else {}
        missing = {Role.PREFILL: self.config.prefill.instances, Role.DECODE: self.config.decode.instances,
                   Role.MIXED: self.config.mixed.instances}
        for role in adopted.values():  # a pool the autoscaler had grown keeps its size
            missing[role] = max(0, missing[role] - 1)
        await asyncio.gather(*(self.add_instance(role) for role, count in missing.items() for _ in range(count)))
        await self.client.start()

    async def adopt(self) -> dict[str, Role]:
        """The live instances a previous API process left (runtime/adopt.py) join the router; their ids
        and roles. Named groups with no live instance are removed."""
        found = adopt.find_instances()
        for f in found:  # held from now on: a stop while they answer releases them too
            self.actors[f.instance_id], self.groups[f.instance_id] = f.actor, f.group
        roles = await asyncio.gather(*(adopt.adopt(f, self._fits) for f in found))
        adopted = {f.instance_id: role for f, role in zip(found, roles) if role is not None}
        for f in found:
            if f.instance_id not in adopted:  # released by adopt.adopt
                self.actors.pop(f.instance_id), self.groups.pop(f.instance_id)
        for name in adopt.remove_orphan_groups(set(adopted)):
            log.warning("removed placement group %s: its instance was gone", name)
        await asyncio.gather(*(self.client.add_instance(i, role, self.actors[i]) for i, role in adopted.items()))
        if found:  # a warning: shown without any logging set up, like the banner
            log.warning("adopted %d of %d instances left by a previous API process: %s", len(adopted), len(found),
                        ", ".join(sorted(adopted)) or "none")
        return adopted

    async def add_instance(self, role: Role) -> str:
        launch = self.launch(role)
        await self.join(launch)
        return launch.instance_id

    def _fits(self, role: Role, engine_config) -> bool:
        """An adopted instance serves this config: its role is one of the pools in use, and its model and
        layout are what this config would launch for that pool."""
        pools = {Role.PREFILL: self.config.prefill, Role.DECODE: self.config.decode, Role.MIXED: self.config.mixed}
        if (role == Role.MIXED) == self.config.disaggregated:
            return False
        wanted = _engine_config(self.config.engine, pools[role])
        return (engine_config.model, engine_config.parallel) == (wanted.model, wanted.parallel)

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
        await self.client.remove_instance(instance_id)
        adopt.release(self.actors.pop(instance_id, None), self.groups.pop(instance_id, None))

    async def _reap(self, instance_id: str) -> None:
        """An instance the router found dead goes: its actor and placement group are released, so its
        resources (its node's, or a replacement node's) serve the next launch, the autoscaler's or an operator's."""
        if instance_id in self.actors:
            log.warning("releasing dead instance %s", instance_id)
            await self.release(instance_id)

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
        """Every instance's actor and placement group go, detached ones too (only a crash leaves those:
        runtime/adopt.py); the reserved CPUs/GPUs go back to a Ray that outlives us."""
        import ray

        if self.client is not None:
            await self.client.close()
        for instance_id in list(self.actors):
            adopt.release(self.actors.pop(instance_id), self.groups.pop(instance_id, None))
        for group in self.groups.values():
            adopt.release(None, group)
        if self.owns_ray:  # a Ray this cluster joined (ray_address, or a test's) outlives it
            ray.shutdown()
