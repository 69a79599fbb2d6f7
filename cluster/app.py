"""`llm-cluster up`'s HTTP side, assembled above the runtime: the runtime builds the cluster, this
module hands its client to the API.

  (1) `runtime.launcher.Cluster` starts Ray, the instance pools and the ClusterClient;
  (2) with `autoscale.enabled`, the autoscaler (autoscale/) starts over the cluster;
  (3) `cluster_app` builds the OpenAI app (api/server.py) over that client and its metrics, and
      gives it `Cluster.add_instance` for `POST /admin/instances` and the autoscaler's status for
      `GET /admin/autoscaler`;
  (4) `serve_cluster` serves it with uvicorn until SIGINT/SIGTERM, then stops the autoscaler and the cluster
      (a signal while the cluster starts stops what had started: only a crash leaves detached instances).

So `runtime/` never imports `api/`, and `api/` knows the cluster only as an `EngineClient`
(cluster/client.py) and a callable.
"""
from __future__ import annotations

import sys

from cluster.api.server import build_app
from cluster.autoscale.controller import Autoscaler
from cluster.config import ClusterConfig
from cluster.runtime.gc_pauses import freeze_startup_objects
from cluster.runtime.launcher import Cluster
from cluster.types import Role


def cluster_app(cluster: Cluster, autoscaler: Autoscaler | None = None):
    """The FastAPI app of a started `cluster`: the OpenAI routes, `POST /admin/instances` and
    `GET /admin/autoscaler`."""
    status = autoscaler.status if autoscaler is not None else (lambda: {"enabled": False})
    return build_app(cluster.client, cluster.metrics, cluster.client.info().name, add_instance=cluster.add_instance,
                     autoscaler_status=status)


def start_autoscaler(cluster: Cluster) -> Autoscaler | None:
    """The autoscaler over a started cluster, if its config enables one (on the running event loop)."""
    if not cluster.config.autoscale.enabled:
        return None
    autoscaler = Autoscaler(cluster, cluster.config, cluster.metrics)
    autoscaler.start()
    return autoscaler


async def serve_cluster(config: ClusterConfig) -> None:
    import uvicorn

    cluster = Cluster(config)
    print(f"starting llm-cluster: model {config.engine.model.path}", file=sys.stderr, flush=True)
    try:
        await cluster.start()
    except BaseException:  # SIGTERM (Ray's driver handler: SystemExit), SIGINT or a failure while it starts:
        await cluster.stop()  # what it had launched or adopted goes, detached instances too
        print("llm-cluster stopped.", flush=True)
        raise
    autoscaler = start_autoscaler(cluster)
    freeze_startup_objects()  # the router and the HTTP streams run here: no full collection walks start-up's objects
    server = uvicorn.Server(uvicorn.Config(cluster_app(cluster, autoscaler), host=config.api.host, port=config.api.port,
                                           log_level="warning", timeout_keep_alive=config.api.keep_alive_s))
    pools = ", ".join(f"{r.value}={len(cluster.client.pool(r))}" for r in Role if cluster.client.pool(r))
    print(f"llm-cluster is up ({pools}).\n  OpenAI API: http://{config.api.host}:{config.api.port}/v1   "
          f"model: {cluster.client.info().name}\n  e.g. OpenAI(base_url='http://{config.api.host}:{config.api.port}/v1', "
          f"api_key='none')\n  Ctrl-C stops it.", flush=True)
    try:
        await server.serve()
    finally:
        if autoscaler is not None:
            await autoscaler.close()
        await cluster.stop()
        print("llm-cluster stopped.", flush=True)
