"""`ray job submit -- llm-cluster up` on a Ray head of our own, as docs/deploy.md shows it.

  1. a Ray head on 127.0.0.1 with its dashboard (job server) and token auth (tests/deploy/ray_head.py);
  2. `ray job submit --runtime-env-json ... -- llm-cluster up --config cluster.yaml` with
     `ray_address: auto` and the tiny CPU model: the job starts the cluster on that Ray;
  3. the `openai` client gets completions from it; nothing it opened listens off loopback;
  4. `ray job stop` ends it: the job is stopped (its SIGTERM runs `up`'s own shutdown), every instance
     actor is DEAD, every placement group REMOVED, the API port closed. Then the head is stopped by PID.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest

from tests.deploy.ray_head import RayHead
from tests.runtime.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ray(head: RayHead, *args: str, timeout_s: float = 60) -> str:
    out = subprocess.run(["ray", *args], env=head.env, capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def _state(head: RayHead, resource: str) -> list[dict]:
    """`ray list <resource>` of this head (Ray's state API, as a user would ask it)."""
    return json.loads(_ray(head, "list", resource, "--address", head.dashboard_url, "--format", "json",
                           "--limit", "1000"))


def _wait(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded
        result = check()
        if result:
            return result
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _api_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _listeners_off_loopback(pids: list[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if any(f"pid={pid}," in line for pid in pids)
            and not any(addr in line.split()[3] for addr in ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"))]


def test_ray_job_submit_serves_and_ray_job_stop_frees_every_instance(tiny_model, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="llmc-ray-")  # short: Ray's socket paths must fit in 107 bytes
    head = RayHead(temp_dir)
    try:
        port = free_port()
        config = tmp_path / "cluster.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "engine": {"model": {"path": tiny_model}},
            "prefill": {"instances": 1, "num_cpus_per_rank": 0.25},
            "decode": {"instances": 1, "num_cpus_per_rank": 0.25},
            "disagg": {"link_host": "auto"},  # the node's address: 127.0.0.1 for this head
            "api": {"port": port}, "ray_address": "auto"}))
        # the job's driver and its actors import this checkout's package
        runtime_env = {"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}}
        out = _ray(head, "job", "submit", "--address", head.dashboard_url, "--no-wait", "--submission-id",
                   "llm-cluster-e2e", "--runtime-env-json", json.dumps(runtime_env),
                   "--", "llm-cluster", "up", "--config", str(config))
        assert "llm-cluster-e2e" in out
        url = f"http://127.0.0.1:{port}/v1"
        try:
            _wait("the API", lambda: _api_answers(url), timeout_s=150)
        except AssertionError:
            raise AssertionError(_ray(head, "job", "logs", "--address", head.dashboard_url, "llm-cluster-e2e")[-3000:])

        import openai

        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for i in range(3):
            done = client.completions.create(model=model, prompt=f"job {i}", max_tokens=4, extra_body={"ignore_eos": True})
            assert done.usage.completion_tokens == 4
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert chat.choices[0].message.content is not None
        assert not _listeners_off_loopback(head.pids()), _listeners_off_loopback(head.pids())

        instances = lambda: [a for a in _state(head, "actors") if a["class_name"] == "InstanceActor"]  # noqa: E731
        assert sorted(a["state"] for a in instances()) == ["ALIVE", "ALIVE"]

        _ray(head, "job", "stop", "--address", head.dashboard_url, "llm-cluster-e2e")  # waits for the end
        status = _ray(head, "job", "status", "--address", head.dashboard_url, "llm-cluster-e2e")
        logs = _ray(head, "job", "logs", "--address", head.dashboard_url, "llm-cluster-e2e")
        assert "was stopped" in status, status + logs[-3000:]
        assert "llm-cluster stopped." in logs, logs[-3000:]  # SIGTERM ran the clean shutdown, not a kill
        _wait("every instance actor dead", lambda: all(a["state"] == "DEAD" for a in instances()), timeout_s=30)
        groups = _state(head, "placement-groups")
        assert groups and all(g["state"] == "REMOVED" for g in groups), groups
        assert not _api_answers(url)
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not head.pids()
