"""Chaos run: a disaggregated cluster under a steady load of `openai` streams while, one after another,
  (1) a decode instance is killed mid-stream,
  (2) a prefill instance is killed while its prompt's KV is on its way (prefilling / transferring),
  (3) redis-server (the state store) is killed and started again empty,
  (4) the Ray worker node hosting an instance dies (a second raylet on 127.0.0.1, removed at once),
  (5) a 10x overload burst (ten times the steady clients at once, one attempt each).
After each fault the run waits for the requests it hit to end, then for the cluster to be back to full
capacity (`/health`'s pool sizes): the cluster releases a dead instance itself, and the autoscaler
(each pool's min = max = its size here) launches its replacement (for (4) on a fresh worker node);
with `--manual-recovery` the run launches it through `POST /admin/instances`, as an operator would.

Everything listens on 127.0.0.1 and is bounded: requests per client, each request's timeout, each
phase's waits. The figures come from the clients' own records (benchmarks/chaos_load.py): per fault,
requests in flight, completed, retried, clear errors (status and body), hung, lost, worst time to end.

    python -m benchmarks.chaos --clients 8 --out benchmarks/results/chaos.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from benchmarks.chaos_load import LoadSpec, SteadyLoad, burst, summarize

ADMIN_KEY = f"sk-chaos-admin-{secrets.token_hex(8)}"
NODE_CPUS = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(check, timeout_s: float, every_s: float = 0.1):
    """`check()`'s first truthy answer within `timeout_s`, else None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = check()
        if out:
            return out
        time.sleep(every_s)
    return None


class Redis:
    """redis-server on 127.0.0.1:`port`, killed (SIGKILL) and started again empty on the same port."""

    def __init__(self, log_path: str):
        self.port, self.log_path, self.proc = _free_port(), log_path, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                                          "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                         stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.2)

        def pong():
            try:
                return client.ping()
            except redis.exceptions.RedisError:
                return False
        if not _until(pong, 10.0, 0.05):
            raise RuntimeError(f"redis-server did not answer on {self.url} (log: {self.log_path})")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


async def _started(start, cluster):
    return start(cluster)  # on the serving loop: the autoscaler's task runs there


class Serving:
    """The cluster and its API in this process (an event loop on a thread), joined to `ray_address`."""

    def __init__(self, config):
        import uvicorn

        from cluster.app import cluster_app, start_autoscaler
        from cluster.runtime.launcher import Cluster

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.cluster = Cluster(config)
        self.run(self.cluster.start(), 600)
        self.base = f"http://127.0.0.1:{config.api.port}"
        self.autoscaler = self.run(_started(start_autoscaler, self.cluster), 60)
        self.server = uvicorn.Server(uvicorn.Config(cluster_app(self.cluster, self.autoscaler), host="127.0.0.1",
                                                    port=config.api.port, log_level="warning"))
        asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        if not _until(lambda: self.server.started, 60.0):
            raise RuntimeError("the API did not start")

    def run(self, coro, timeout_s: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)

    def pools(self) -> dict:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=10) as r:
                return json.load(r)["pools"]
        except OSError:
            return {}

    def launch(self, role: str) -> str:
        """A new instance through the admin API (what an operator, or the autoscaler, does)."""
        request = urllib.request.Request(self.base + "/admin/instances", data=json.dumps({"role": role}).encode(),
                                         headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            return json.load(r)["instance_id"]

    def node_of(self, instance_id: str) -> str | None:
        from ray.util.placement_group import placement_group_table

        group = self.cluster.groups.get(instance_id)
        return placement_group_table(group).get("bundles_to_node_id", {}).get(0) if group is not None else None

    def stop(self) -> None:
        self.server.should_exit = True
        time.sleep(0.5)
        if self.autoscaler is not None:
            self.run(self.autoscaler.close(), 60)
        self.run(self.cluster.stop(), 120)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _config(args, redis_url: str, port: int):
    from cluster.config import load_cluster_config

    pool = {"num_cpus_per_rank": 0.5}
    return load_cluster_config(None, {
        "engine": {"model": {"path": args.model}, "cache": {"num_blocks": args.num_blocks}},
        "prefill": {"instances": args.prefill, **pool}, "decode": {"instances": args.decode, **pool},
        "disagg": {"transfer_timeout_s": 5.0}, "router": {"heartbeat_s": 0.5, "instance_ttl_s": 3.0},
        "api": {"port": port, "max_pending": args.clients * 2, "admin_keys": [ADMIN_KEY]},
        "store": {"redis_url": redis_url, "namespace": "chaos:", "timeout_s": 0.5, "retry_interval_s": 1.0},
        "autoscale": {"enabled": not args.manual_recovery, "interval_s": 1.0, "role_flip": False,
                      "prefill": {"min_instances": args.prefill, "max_instances": args.prefill},
                      "decode": {"min_instances": args.decode + 1, "max_instances": args.decode + 1}},
        "ray_address": args.ray_address})


class Run:
    """One chaos run: setup, the faults in order, the report."""

    def __init__(self, args):
        from ray.cluster_utils import Cluster as RayCluster

        self.args, self.phases, self.t0 = args, [], time.monotonic()
        os.makedirs(args.work_dir, exist_ok=True)
        self.redis = Redis(os.path.join(args.work_dir, "redis-server.log"))
        self.redis.start()
        # the head holds the starting pools exactly; instances launched later land on worker nodes
        head_cpus = int((args.prefill + args.decode) * 0.5 + 0.999)
        self.ray = RayCluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        args.ray_address = self.ray.address
        self.serving = Serving(_config(args, self.redis.url, _free_port()))
        self.target = {"prefill": args.prefill, "decode": args.decode + 1}
        self.worker = self.ray.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1")
        # the head is full: the extra decode instance (the autoscaler's, below its pool's minimum) goes to the worker
        if args.manual_recovery:
            self.on_worker = self.serving.launch("decode")
        else:  # decode starts one below its minimum: the autoscaler's first decision adds it
            _until(lambda: self.serving.pools() == {**self.target, "mixed": 0}, args.capacity_timeout_s)
            self.on_worker = next((i for i in self.serving.cluster.groups
                                   if self.serving.node_of(i) == self.worker.node_id), None)
        if self.on_worker is None or self.serving.node_of(self.on_worker) != self.worker.node_id:
            raise RuntimeError("the extra decode instance did not land on the worker node")
        self.spec = LoadSpec(model=self.serving.cluster.client.info().name, url=self.serving.base + "/v1",
                             max_tokens=args.max_tokens, timeout_s=args.request_timeout_s)
        self.load = SteadyLoad(self.spec, args.clients, args.max_requests_per_client)

    # -- the faults ---------------------------------------------------------------------------------
    def kill_decode_mid_stream(self) -> dict:
        legs = self.serving.cluster.client.legs

        def victim():
            counts: dict[str, int] = {}
            for leg in list(legs.values()):
                if leg.state.name == "DECODING" and leg.decode_id and leg.decode_id != self.on_worker:
                    counts[leg.decode_id] = counts.get(leg.decode_id, 0) + 1
            return max(counts, key=counts.get) if counts else None
        instance_id = _until(victim, 30.0, 0.005)
        return self._kill(instance_id, "decode", legs_state="DECODING")

    def kill_prefill_mid_transfer(self) -> dict:
        legs = self.serving.cluster.client.legs

        def victim():
            for leg in list(legs.values()):
                if leg.state.name in ("PREFILLING", "TRANSFERRING") and leg.prefill_id:
                    return leg.prefill_id, leg.state.name
            return None
        found = _until(victim, 30.0, 0.001)
        return self._kill(found[0] if found else None, "prefill", legs_state=found[1] if found else None)

    def _kill(self, instance_id: str | None, role: str, legs_state: str | None) -> dict:
        if instance_id is None:
            return {"skipped": f"no {role} instance was busy within 30 s"}
        legs = [l for l in self.serving.cluster.client.legs.values() if instance_id in (l.prefill_id, l.decode_id)]
        self.serving.cluster.kill_instance(instance_id)
        return {"victims": [instance_id], "victim_state": legs_state, "router_legs_on_victims": len(legs),
                "recover": lambda: self._reconcile([instance_id])}

    def restart_redis(self) -> dict:
        self.redis.kill()
        time.sleep(self.args.redis_outage_s)
        self.redis.start()
        return {"outage_s": self.args.redis_outage_s, "recover": self._store_rebuilt}

    def kill_worker_node(self) -> dict:
        node_id = self.worker.node_id
        victims = [i for i in self.serving.cluster.groups if self.serving.node_of(i) == node_id]
        legs = [l for l in self.serving.cluster.client.legs.values() if {l.prefill_id, l.decode_id} & set(victims)]
        self.ray.remove_node(self.worker, allow_graceful=False)

        def recover() -> dict:
            self.worker = self.ray.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1")  # the replacement node
            return self._reconcile(victims)
        return {"node": node_id, "victims": victims, "router_legs_on_victims": len(legs), "recover": recover}

    def overload(self) -> dict:
        n = self.args.clients * self.args.burst_factor
        records = burst(self.spec, n, self.args.request_timeout_s * 2)
        self.load.records.extend(records)
        return {"burst_requests": n, "burst": summarize(records, records[0].t_start, time.monotonic())}

    # -- recovery -----------------------------------------------------------------------------------
    def _reconcile(self, victims: list[str]) -> dict:
        """Once the victims are found dead the cluster releases them (and any instance that died with
        them); the autoscaler launches what the pools miss, or, with --manual-recovery, this run does
        through the admin API, as an operator would."""
        t = time.monotonic()
        cluster = self.serving.cluster
        before = set(cluster.actors)
        _until(lambda: not set(victims) & set(cluster.actors), 60.0)  # found dead and released
        dead = sorted(before - set(cluster.actors))
        launched = []
        if self.args.manual_recovery:
            pools = self.serving.pools()
            for role, want in self.target.items():
                launched += [self.serving.launch(role) for _ in range(want - pools.get(role, 0))]
        return {"dead": dead, "collateral": [i for i in dead if i not in victims],
                "relaunched": launched or "by the autoscaler", "released_s": round(time.monotonic() - t, 3)}

    def _store_rebuilt(self) -> dict:
        """Every live instance registered again and the shared prefix found in the index."""
        from cluster.engine.kv_cache import prefix_hashes
        from cluster.store import make_store

        other = make_store(self.redis.url, namespace="chaos:")  # another router's view of the new Redis
        hashes = prefix_hashes(self.spec.shared_prefix, self.serving.cluster.config.engine.cache.block_size)
        t = time.monotonic()
        try:
            registered = _until(lambda: len(other.list_instances()) >= sum(self.serving.pools().values()), 60.0)
            t_reg = time.monotonic() - t
            rebuilt = _until(lambda: other.match_prefix(hashes), 60.0)
            return {"redis_reregistered": bool(registered), "reregistered_s": round(t_reg, 3),
                    "prefix_index_rebuilt": bool(rebuilt), "prefix_index_rebuilt_s": round(time.monotonic() - t, 3)}
        finally:
            other.close()

    # -- the run ------------------------------------------------------------------------------------
    def phase(self, name: str, fault) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {name} ...", flush=True)
        in_flight = [r for r in self.load.records if r.t_end is None]
        t_fault = time.monotonic()
        info = fault()
        recover = info.pop("recover", None)
        _until(lambda: all(r.t_end is not None for r in in_flight), self.args.request_timeout_s * 2)
        time.sleep(self.args.settle_s)
        t_end = time.monotonic()
        if recover is not None:
            info.update(recover())
        full = _until(lambda: self.serving.pools() == {**self.target, "mixed": 0}, self.args.capacity_timeout_s)
        info.update(fault=name, t_fault=t_fault, t_end=t_end, capacity_restored=bool(full),
                    capacity_restored_s=round(time.monotonic() - t_fault, 3), pools_after=self.serving.pools())
        self.phases.append(info)

    def summaries(self) -> None:
        """Once every client has ended: each fault's figures from the records, printed."""
        for info in self.phases:
            t_fault, t_end = info.pop("t_fault"), info.pop("t_end")
            info.update(summarize(self.load.records, t_fault, t_end))
            print(f"{info['fault']:>28}: in flight {info['in_flight_at_fault']}, completed {info['completed']}, "
                  f"retried {info['retried']}, clear errors {info['clear_errors']} {info['clear_error_statuses']}, "
                  f"hung {info['hung']}, lost {info['lost']}, worst end {info['worst_time_to_end_s']} s, "
                  f"capacity back: {info['capacity_restored']} ({info['capacity_restored_s']} s)", flush=True)

    def execute(self) -> dict:
        self.load.start()
        time.sleep(self.args.warmup_s)
        for name, fault in (("decode_killed_mid_stream", self.kill_decode_mid_stream),
                            ("prefill_killed_mid_transfer", self.kill_prefill_mid_transfer),
                            ("redis_restarted", self.restart_redis),
                            ("worker_node_killed", self.kill_worker_node),
                            ("overload_burst", self.overload)):
            self.phase(name, fault)
        self.load.stop(self.args.request_timeout_s * 2)
        self.summaries()
        every = summarize(self.load.records, 0.0, time.monotonic())
        return {"hung": every["hung"], "lost": every["lost"], "requests": every["requests"],
                "completed": every["completed"], "retried": every["retried"], "clear_errors": every["clear_errors"],
                "capacity_restored": all(p["capacity_restored"] for p in self.phases), "target_pools": self.target,
                "recovery": ("manual: each lost instance re-launched through POST /admin/instances"
                             if self.args.manual_recovery else "the autoscaler (each pool's min = max = its size)"),
                "wall_s": round(time.monotonic() - self.t0, 1), "phases": self.phases,
                "args": {k: v for k, v in vars(self.args).items() if k != "ray_address"}}

    def close(self) -> None:
        import ray

        self.load.stop(1.0)
        for step in (self.serving.stop, ray.shutdown, self.ray.shutdown, self.redis.kill):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - tear down the rest regardless
                print(f"teardown: {exc!r}", file=sys.stderr)


def run(args) -> dict:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    chaos = Run(args)
    try:
        report = chaos.execute()
    finally:
        chaos.close()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: the tiny random model)")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2, help="on the head node; one more runs on the worker node")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients of the steady load")
    p.add_argument("--burst-factor", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-requests-per-client", type=int, default=400)
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument("--redis-outage-s", type=float, default=3.0)
    p.add_argument("--capacity-timeout-s", type=float, default=180.0)
    p.add_argument("--manual-recovery", action="store_true",
                   help="the run launches replacements through the admin API (default: the autoscaler does)")
    p.add_argument("--work-dir", default="/tmp/llm-cluster-chaos")
    p.add_argument("--out", default="benchmarks/results/chaos.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is None:
        from cluster.models.make import ensure_default_model

        args.model = ensure_default_model()
    report = run(args)
    print(json.dumps({k: v for k, v in report.items() if k not in ("phases", "args")}, indent=1))
    return 0 if report["hung"] == 0 and report["lost"] == 0 and report["capacity_restored"] else 1


if __name__ == "__main__":
    sys.exit(main())
