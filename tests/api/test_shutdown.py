"""SIGTERM to `llm-cluster up` (a real subprocess: local Ray on 127.0.0.1, 1 prefill + 1 decode on
CPU) with 16 streams in flight through the `openai` client: every stream finishes whole, new requests
get 503 with Retry-After and an OpenAI-style body, /health answers 503 `draining`, and the process
then stops on its own with status 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.store.conftest import free_port

pytestmark = pytest.mark.slow
NUM_STREAMS = 16
MAX_TOKENS = 600
START_TIMEOUT_S = 240


def _start_up(model_dir: str, tmp_path) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(json.dumps({"engine": {"model": {"path": model_dir}},
                               "prefill": {"instances": 1, "num_cpus_per_rank": 0.25},
                               "decode": {"instances": 1, "num_cpus_per_rank": 0.25},
                               "api": {"port": port, "drain_timeout_s": 120}}))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--config", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        lines.append(proc.stdout.readline())
        if "OpenAI API:" in lines[-1]:
            break
    assert any("OpenAI API:" in line for line in lines), "".join(lines)
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return proc, f"http://127.0.0.1:{port}", lines


def test_sigterm_lets_16_streams_finish_and_refuses_new_requests(checkpoint_dir, tmp_path):
    proc, base, lines = _start_up(checkpoint_dir("llama"), tmp_path)
    try:
        assert any("no API key set" in line and "loopback only" in line for line in lines), "".join(lines)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=180)
        model = client.models.list().data[0].id
        started = threading.Semaphore(0)
        results: list[dict] = []

        def stream(i: int) -> None:
            record = {"i": i, "text": "", "finish_reason": None, "error": None, "chunks": 0}
            try:
                for chunk in client.completions.create(model=model, prompt=f"stream {i}", max_tokens=MAX_TOKENS,
                                                       stream=True, extra_body={"ignore_eos": True},
                                                       stream_options={"include_usage": True}):
                    if chunk.choices:
                        record["chunks"] += 1
                        if record["chunks"] == 1:
                            started.release()
                        record["finish_reason"] = chunk.choices[0].finish_reason or record["finish_reason"]
                    if chunk.usage is not None:
                        record["completion_tokens"] = chunk.usage.completion_tokens
            except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                record["error"] = repr(exc)
                started.release()
            results.append(record)

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(NUM_STREAMS)]
        for t in threads:
            t.start()
        for _ in range(NUM_STREAMS):
            assert started.acquire(timeout=120), "a stream never started"
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # the signal lands on the server's loop within moments
            refused = httpx.post(base + "/v1/completions", json={"model": model, "prompt": "late", "max_tokens": 2},
                                 timeout=30)
            if refused.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "draining"
        with pytest.raises(openai.InternalServerError) as info:  # what an openai client sees of it
            client.completions.create(model=model, prompt="late", max_tokens=2)
        assert info.value.status_code == 503
        health = httpx.get(base + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        for t in threads:
            t.join(timeout=180)
        assert len(results) == NUM_STREAMS and not any(t.is_alive() for t in threads)
        for record in results:
            assert record["error"] is None and record["finish_reason"] == "length", record
            assert record["completion_tokens"] == MAX_TOKENS, record
        assert proc.wait(timeout=120) == 0, "".join(lines)
        out = "".join(lines)
        assert "draining:" in out and "drained (0 request(s)" in out and "llm-cluster stopped." in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
