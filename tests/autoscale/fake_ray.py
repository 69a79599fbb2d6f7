"""A Ray cluster whose real autoscaler adds and removes nodes on this machine: Ray's fake multi-node
provider (what `ray.cluster_utils.AutoscalingCluster` drives; its example config is missing from the
ray 2.60 wheel, so the config is written here). Not through `AutoscalingCluster.start`, which runs
`ray stop --force` and would kill every other Ray on the machine: a head of our own on 127.0.0.1, a
port and temp dir of our own, and at the end only the processes under that temp dir are stopped.

Worker nodes advertise {"CPU": 1, "GPU": 1}: the GPU is a label to Ray (the engines run on CPU), so
an instance asking for one GPU needs a node of its own, and Ray's autoscaler starts one for it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_cluster_config(gcs_address: str, head_cpus: int, max_gpu_nodes: int, idle_timeout_s: float) -> dict:
    """The fake provider's cluster config: a head of `head_cpus` CPUs, up to `max_gpu_nodes` GPU nodes."""
    return {
        "cluster_name": "llm-cluster-test",
        "max_workers": max_gpu_nodes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 80 * 2**20}, "node_config": {},
                    "min_workers": 0, "max_workers": max_gpu_nodes},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingRay:
    def __init__(self, head_cpus: int = 2, max_gpu_nodes: int = 3, idle_timeout_s: float = 6.0):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="llm-cluster-fake-ray-")
        self.config_path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(self.config_path, "w") as f:
            json.dump(fake_cluster_config(self.address, head_cpus, max_gpu_nodes, idle_timeout_s), f)
        self.head_cpus = head_cpus
        self.env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    # loopback only, a test cluster: the driver connects without a token
                    "RAY_AUTH_MODE": "disabled"}

    def start(self) -> None:
        subprocess.run(["ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                        f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
                        "--include-dashboard=false", "--disable-usage-stats",
                        f"--autoscaling-config={self.config_path}"],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def gpu_nodes(self) -> int:
        """Live worker nodes with a GPU, as the GCS lists them."""
        import ray

        return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)

    def wait_for_gpu_nodes(self, count: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.gpu_nodes() != count and time.monotonic() < deadline:
            time.sleep(0.5)
        return self.gpu_nodes()

    def stop(self) -> None:
        """Every process of this cluster (its command line names our temp dir or our GCS port), and only those."""
        import psutil

        ours = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if self.temp_dir in cmdline or f"127.0.0.1:{self.port}" in cmdline or f"--gcs-address={self.address}" in cmdline:
                ours.append(proc)
        for proc in ours:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(ours, timeout=10)
        for proc in alive:  # gcs_server may need a SIGKILL after SIGTERM
            try:
                proc.kill()
            except psutil.Error:
                pass
