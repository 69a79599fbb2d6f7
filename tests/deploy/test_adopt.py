"""Detached instances: an API process that crashes leaves its instances serving, the next one adopts them.

  1. a Ray head of the test's own on 127.0.0.1 (tests/deploy/ray_head.py, no dashboard);
  2. `python -m cluster.cli up` with `detached_instances: true` joins it; SIGTERM while its instances
     start releases them; started again, it serves a greedy completion through the `openai` client;
  3. SIGKILL of that API process: its two instance actors stay alive (a driver of the test, in the
     cluster's Ray namespace, finds them by name and they answer `ping`);
  4. a second `up` with the same config adopts them: the same instance ids in /health, no new actor, and
     the same greedy completion;
  5. SIGTERM of the second: its clean stop ends every actor and removes every placement group of the
     cluster, detached or not. Then the head is stopped by PID.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from tests.deploy.ray_head import RayHead
from tests.runtime.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMESPACE = "adopt_test"


class Up:
    """`python -m cluster.cli up` as a subprocess, its output read on a thread (bounded waits)."""

    def __init__(self, config: str, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--config", config], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # bounded
            try:
                line = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None or text in line:
                break
        assert any(text in line for line in self.lines), "".join(self.lines)[-4000:]

    def wait_serving(self, url: str, timeout_s: float) -> None:
        """Its banner, then its port answering (the banner is printed just before uvicorn binds)."""
        self.wait_for("OpenAI API:", timeout_s)

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    return response.status == 200
            except OSError:
                assert self.proc.poll() is None, "".join(self.lines)[-4000:]
                return False

        _wait("the API to answer", answers, timeout_s=30)

    def kill(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)


def _health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as response:
        return json.loads(response.read())


def _complete(url: str) -> str:
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    done = client.completions.create(model=model, prompt="Adopted instances say", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 8
    return done.choices[0].text


def _wait(what: str, check, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


_LOOK = """
import json, sys
import ray
ray.init(address=sys.argv[1], namespace=sys.argv[2], log_to_driver=False)
names = sorted(ray.util.list_named_actors())
pings = [ray.get(ray.get_actor(n).ping.remote(), timeout=30) for n in names] if sys.argv[3] == "ping" else []
groups = sorted(g["name"] for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED")
print(json.dumps({"actors": names, "pings": pings, "groups": groups}))
"""


def _look(head: RayHead, ping: bool = False) -> dict:
    """What a driver in the cluster's Ray namespace sees: its named actors (and their answers to `ping`),
    and the placement groups not removed. A process of its own: Ray reads its auth token once a process."""
    out = subprocess.run([sys.executable, "-c", _LOOK, head.gcs_address, f"llm-cluster/{NAMESPACE}",
                          "ping" if ping else "-"], env=head.env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_crashed_api_leaves_its_instances_to_the_next_one(tiny_model, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="llmc-ray-")  # short: Ray's socket paths must fit in 107 bytes
    head = RayHead(temp_dir, dashboard=False)
    ups: list[Up] = []

    try:
        port = free_port()
        config = tmp_path / "cluster.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "engine": {"model": {"path": tiny_model}},
            "prefill": {"instances": 1, "num_cpus_per_rank": 0.25},
            "decode": {"instances": 1, "num_cpus_per_rank": 0.25},
            "disagg": {"link_host": "auto"}, "router": {"heartbeat_s": 0.5, "instance_ttl_s": 3.0},
            "api": {"port": port}, "store": {"namespace": f"{NAMESPACE}:"},
            "ray_address": head.gcs_address, "detached_instances": True}))
        env = dict(head.env, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        url = f"http://127.0.0.1:{port}/v1"

        ups.append(Up(str(config), env))  # stopped while its instances start: it releases what it launched
        _wait("two instance actors", lambda: len(_look(head)["actors"]) == 2, timeout_s=90)
        ups[0].kill(signal.SIGTERM)
        ups[0].proc.wait(timeout=60)
        ups[0].wait_for("llm-cluster stopped.", timeout_s=5)
        _wait("nothing left of the stopped start", lambda: _look(head) == {"actors": [], "pings": [], "groups": []},
              timeout_s=30)

        ups[0] = Up(str(config), env)
        ups[0].wait_serving(url, timeout_s=150)
        first = _complete(url)
        ids = set(_health(url)["instances"])
        assert len(ids) == 2, ids

        ups[0].kill(signal.SIGKILL)
        ups[0].proc.wait(timeout=30)
        names = sorted(f"instance/{i}" for i in ids)
        assert _look(head, ping=True) == {"actors": names, "pings": [n.removeprefix("instance/") for n in names],
                                          "groups": names}

        ups.append(Up(str(config), env))
        ups[1].wait_serving(url, timeout_s=150)
        assert set(_health(url)["instances"]) == ids  # adopted: the same instances, none launched
        assert any("adopted 2 of 2 instances" in line for line in ups[1].lines), "".join(ups[1].lines)[-3000:]
        assert _look(head)["actors"] == names
        assert _complete(url) == first

        ups[1].kill(signal.SIGTERM)
        ups[1].proc.wait(timeout=60)
        ups[1].wait_for("llm-cluster stopped.", timeout_s=5)  # the clean stop, not a kill
        _wait("no instance actor or placement group left", lambda: _look(head) == {"actors": [], "pings": [], "groups": []},
              timeout_s=30)
    finally:
        for up in ups:
            up.kill(signal.SIGKILL)
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not head.pids()


def test_only_an_instance_of_this_configs_model_and_layout_is_adopted():
    """What `Cluster.adopt` keeps of what it finds: the config may have changed between the two APIs."""
    from dataclasses import replace

    from cluster.config import ClusterConfig, from_dict
    from cluster.runtime.launcher import Cluster, _engine_config
    from cluster.types import Role

    config = from_dict(ClusterConfig, {"engine": {"model": {"path": "/m"}}, "decode": {"tp": 2}, "ray_address": "auto",
                                       "detached_instances": True})
    cluster = Cluster(config)
    prefill, decode = _engine_config(config.engine, config.prefill), _engine_config(config.engine, config.decode)
    assert cluster._fits(Role.PREFILL, prefill) and cluster._fits(Role.DECODE, decode)
    assert not cluster._fits(Role.DECODE, prefill)  # tp 1, where this config's decode pool has 2
    assert not cluster._fits(Role.MIXED, prefill)  # no mixed pool in a disaggregated config
    other = replace(prefill, model=replace(prefill.model, path="/other"))
    assert not cluster._fits(Role.PREFILL, other)
