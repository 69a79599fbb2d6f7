"""A real cluster for tests: local Ray on loopback, instance actors, the API on a free port."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: loopback only


ADMIN_KEY = "sk-test-admin-runtime"  # /admin/* answers an admin key only (off without one)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningCluster:
    """Cluster + uvicorn inside one event loop on a background thread."""

    def __init__(self, config):
        from cluster.runtime.launcher import Cluster

        self.cluster = Cluster(config)
        self.port = config.api.port
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.cluster.start(), timeout_s=240)
        import uvicorn

        from cluster.app import cluster_app, start_autoscaler

        async def autoscaler():  # on the cluster's event loop; None unless the config enables it
            return start_autoscaler(self.cluster)

        self.autoscaler = self.run(autoscaler())
        app = cluster_app(self.cluster, self.autoscaler)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "API server did not start"

    def run(self, coro, timeout_s: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)

    @property
    def client(self):
        return self.cluster.client

    def stop(self) -> None:
        self.server.should_exit = True
        time.sleep(0.5)
        if self.autoscaler is not None:
            self.run(self.autoscaler.close(), timeout_s=30)
        self.run(self.cluster.stop(), timeout_s=60)
        self.loop.call_soon_threadsafe(self.loop.stop)


def cluster_config(model_dir: str, prefill=1, decode=1, mixed=0, **engine):
    from cluster.config import (ApiConfig, CacheConfig, ClusterConfig, DisaggConfig, EngineConfig, ModelConfig,
                                PoolConfig, RouterConfig)

    return ClusterConfig(
        engine=EngineConfig(model=ModelConfig(path=model_dir), cache=CacheConfig(num_blocks=engine.get("num_blocks", 512))),
        prefill=PoolConfig(instances=prefill, num_cpus_per_rank=0.25),
        decode=PoolConfig(instances=decode, num_cpus_per_rank=0.25),
        mixed=PoolConfig(instances=mixed, num_cpus_per_rank=0.25),
        disagg=DisaggConfig(transfer_timeout_s=engine.get("transfer_timeout_s", 5.0)),
        router=RouterConfig(heartbeat_s=0.5, instance_ttl_s=3.0),
        api=ApiConfig(port=free_port(), max_pending=engine.get("max_pending", 256), admin_keys=(ADMIN_KEY,)),
    )


@pytest.fixture(scope="session")
def tiny_model(checkpoint_dir):
    return checkpoint_dir("llama")
