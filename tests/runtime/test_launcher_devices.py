"""Which CUDA devices an instance actor's ranks bind (pure logic; the GPU path runs in the GPU benchmarks)."""
from __future__ import annotations

import pytest

from cluster.config import ConfigError, RunnerConfig
from cluster.runtime.instance import local_device_ids


def test_with_every_gpu_of_the_host_visible_the_assigned_ids_are_the_indices():
    assert local_device_ids(["1"], visible=None) == (1,)
    assert local_device_ids([6, 7], visible=None) == (6, 7)


def test_a_host_that_shows_some_gpus_maps_ray_s_ids_to_their_place_in_the_list():
    # the raylet saw CUDA_VISIBLE_DEVICES=4,5,6,7: Ray names GPU 6 "6", which is CUDA device 2 here
    assert local_device_ids(["6"], visible=["4", "5", "6", "7"]) == (2,)
    assert local_device_ids([4, 5], visible=["4", "5", "6", "7"]) == (0, 1)


def test_device_ids_are_validated_by_name():
    assert RunnerConfig(device_ids=(1, 0)).device_ids == (1, 0)
    with pytest.raises((ConfigError, ValueError), match="device_ids"):
        RunnerConfig(device_ids=(-1,))


_ACTOR_SEES = """
import json, os, sys
import ray
from cluster.runtime.instance import _visible_gpus, local_device_ids

ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")

@ray.remote(num_cpus=1, num_gpus=1)
class Probe:
    def sees(self):
        visible = _visible_gpus()
        assigned = ray.get_gpu_ids()
        return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "assigned": [str(i) for i in assigned],
                "local": list(local_device_ids(assigned, visible))}

print(json.dumps(ray.get(Probe.remote().sees.remote())))
ray.shutdown()
"""


@pytest.mark.parametrize("host_visible", [None, "4,5"])
@pytest.mark.parametrize("node_env", ["launcher", "bare"])
def test_a_ray_actor_binds_the_gpu_ray_assigned_it(host_visible, node_env):
    """On a real (local) Ray node that declares two GPUs (none is used: this checks what the actor's
    environment says, on CPU). With the launcher's node environment (RAYLET_ENV) the actor sees every
    GPU of the host and binds its own by its place there; on a bare node Ray masks the actor to its GPU,
    which is then device 0."""
    import json
    import os
    import subprocess
    import sys

    from cluster.runtime.launcher import RAYLET_ENV

    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "RAY_ADDRESS")}  # a Ray of its own
    if host_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = host_visible
    if node_env == "launcher":
        env.update({k: v for k, v in RAYLET_ENV.items() if k != "RAY_preload_python_modules"})
    done = subprocess.run([sys.executable, "-c", _ACTOR_SEES], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    host = (host_visible or "0,1").split(",")
    assert seen["assigned"][0] in host
    if node_env == "launcher":
        assert seen["visible"] == host_visible  # every GPU of the host, as the node saw them
        assert seen["local"] == [host.index(seen["assigned"][0])]
    else:
        assert seen["visible"] == seen["assigned"][0] and seen["local"] == [0]
