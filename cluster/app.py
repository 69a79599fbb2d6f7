"""`llm-cluster up`'s HTTP side, assembled above the runtime: the runtime builds the cluster, this
module hands its client to the API.

  (1) `runtime.launcher.Cluster` starts Ray, the instance pools and the ClusterClient;
  (2) `cluster_app` builds the OpenAI app (api/server.py) over that client and its metrics, and
      gives it `Cluster.add_instance` for `POST /admin/instances`;
  (3) `serve_cluster` serves it with uvicorn until SIGINT/SIGTERM, then stops the cluster.

So `runtime/` never imports `api/`, and `api/` knows the cluster only as an `EngineClient`
(cluster/client.py) and a callable.
"""
from __future__ import annotations

import sys

from cluster.api.server import build_app
from cluster.config import ClusterConfig
from cluster.runtime.gc_pauses import freeze_startup_objects
from cluster.runtime.launcher import Cluster
from cluster.types import Role


def cluster_app(cluster: Cluster):
    """The FastAPI app of a started `cluster`: the OpenAI routes and `POST /admin/instances`."""
    return build_app(cluster.client, cluster.metrics, cluster.client.info().name, add_instance=cluster.add_instance)


async def serve_cluster(config: ClusterConfig) -> None:
    import uvicorn

    cluster = Cluster(config)
    print(f"starting llm-cluster: model {config.engine.model.path}", file=sys.stderr, flush=True)
    await cluster.start()
    freeze_startup_objects()  # the router and the HTTP streams run here: no full collection walks start-up's objects
    server = uvicorn.Server(uvicorn.Config(cluster_app(cluster), host=config.api.host, port=config.api.port,
                                           log_level="warning", timeout_keep_alive=config.api.keep_alive_s))
    pools = ", ".join(f"{r.value}={len(cluster.client.pool(r))}" for r in Role if cluster.client.pool(r))
    print(f"llm-cluster is up ({pools}).\n  OpenAI API: http://{config.api.host}:{config.api.port}/v1   "
          f"model: {cluster.client.info().name}\n  e.g. OpenAI(base_url='http://{config.api.host}:{config.api.port}/v1', "
          f"api_key='none')\n  Ctrl-C stops it.", flush=True)
    try:
        await server.serve()
    finally:
        await cluster.stop()
        print("llm-cluster stopped.", flush=True)
