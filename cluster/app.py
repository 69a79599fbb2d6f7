"""`llm-cluster up`'s HTTP side, assembled above the runtime: the runtime builds the cluster, this
module hands its client to the API.

  (1) the API's keys are read (config/keys.py: the config, LLM_CLUSTER_API_KEYS / _ADMIN_KEYS, key
      files such as a mounted Secret), before anything starts: keys that cannot be read stop it here;
  (2) `runtime.launcher.Cluster` starts Ray, the instance pools and the ClusterClient;
  (3) with `autoscale.enabled`, the autoscaler (autoscale/) starts over the cluster;
  (4) `cluster_app` builds the OpenAI app (api/server.py) over that client and its metrics, and
      gives it `Cluster.add_instance` for `POST /admin/instances` and the autoscaler's status for
      `GET /admin/autoscaler` (both answer an admin key only);
  (5) `serve_cluster` says who can reach it (keys or none, loopback or not: a warning when it listens
      beyond this machine without a key), then serves it with uvicorn until SIGTERM or SIGINT, which
      drain it (api/graceful.py: 503 to new requests, in-flight ones get `api.drain_timeout_s`), then
      stops the autoscaler and the cluster (a signal while the cluster starts stops what had started:
      only a crash leaves detached instances).

So `runtime/` never imports `api/`, and `api/` knows the cluster only as an `EngineClient`
(cluster/client.py) and a callable.
"""
from __future__ import annotations

import asyncio
import sys

from cluster.api.auth import KeyRing, exposure_notes
from cluster.api.graceful import GracefulServer
from cluster.api.server import build_app
from cluster.autoscale.controller import Autoscaler
from cluster.config import ClusterConfig
from cluster.runtime.gc_pauses import freeze_startup_objects
from cluster.runtime.launcher import Cluster
from cluster.types import Role


def cluster_app(cluster: Cluster, autoscaler: Autoscaler | None = None, keys: KeyRing | None = None):
    """The FastAPI app of a started `cluster`: the OpenAI routes, `POST /admin/instances` and
    `GET /admin/autoscaler`, held to `cluster.config.api` (its keys: `keys`, or read from it)."""
    status = autoscaler.status if autoscaler is not None else (lambda: {"enabled": False})
    return build_app(cluster.client, cluster.metrics, cluster.client.info().name, add_instance=cluster.add_instance,
                     autoscaler_status=status, api=cluster.config.api, keys=keys)


def start_autoscaler(cluster: Cluster) -> Autoscaler | None:
    """The autoscaler over a started cluster, if its config enables one (on the running event loop)."""
    if not cluster.config.autoscale.enabled:
        return None
    autoscaler = Autoscaler(cluster, cluster.config, cluster.metrics)
    autoscaler.start()
    return autoscaler


async def serve_cluster(config: ClusterConfig) -> None:
    import uvicorn

    keys = KeyRing(config.api)
    cluster = Cluster(config)
    print(f"starting llm-cluster: model {config.engine.model.path}", file=sys.stderr, flush=True)
    try:
        await cluster.start()
    except BaseException:  # SIGTERM (Ray's driver handler: SystemExit), SIGINT or a failure while it starts:
        await cluster.stop()  # what it had launched or adopted goes, detached instances too
        print("llm-cluster stopped.", flush=True)
        raise
    autoscaler = start_autoscaler(cluster)
    app = cluster_app(cluster, autoscaler, keys)
    freeze_startup_objects()  # the router and the HTTP streams run here: no full collection walks start-up's objects

    async def drain() -> None:
        print(f"draining: no new requests; {cluster.client.num_pending} in flight get up to "
              f"{config.api.drain_timeout_s} s", flush=True)
        if autoscaler is not None:
            await autoscaler.close()  # nothing scales while the cluster empties
        cut = await app.state.server.drain(config.api.drain_timeout_s)
        print(f"drained ({cut} request(s) still running at the deadline ended with an error)", flush=True)

    server = GracefulServer(uvicorn.Config(app, host=config.api.host, port=config.api.port, log_level="warning",
                                           timeout_keep_alive=config.api.keep_alive_s), drain)
    pools = ", ".join(f"{r.value}={len(cluster.client.pool(r))}" for r in Role if cluster.client.pool(r))
    key = "api_key='<your key>'" if not keys.open else "api_key='none'"
    serving = asyncio.ensure_future(server.serve())
    try:
        # "up" only once the socket listens: a client that connects on reading it must not be refused
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            print(f"llm-cluster is up ({pools}).\n  OpenAI API: http://{config.api.host}:{config.api.port}/v1   "
                  f"model: {cluster.client.info().name}\n  e.g. OpenAI(base_url='http://{config.api.host}:"
                  f"{config.api.port}/v1', {key})\n  " + "\n  ".join(exposure_notes(config.api, keys))
                  + "\n  Ctrl-C (or SIGTERM) drains and stops it.", flush=True)
        await serving
    finally:
        if not serving.done():
            serving.cancel()
        if autoscaler is not None:
            await autoscaler.close()
        await cluster.stop()
        print("llm-cluster stopped.", flush=True)
