"""`llm-cluster up` as a user starts it: a subprocess, the openai client, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.procs import stop
from tests.prometheus import start_prometheus, until_answered
from tests.runtime.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def up(tiny_model, tmp_path_factory):
    port = free_port()
    cfg = tmp_path_factory.mktemp("up") / "cluster.yaml"
    cfg.write_text(json.dumps({"engine": {"model": {"path": tiny_model}},
                               "prefill": {"instances": 1, "num_cpus_per_rank": 0.25},
                               "decode": {"instances": 1, "num_cpus_per_rank": 0.25},
                               "api": {"port": port}}))  # JSON is YAML
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--config", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "OpenAI API:" in line or proc.poll() is not None:
            break
    assert any("OpenAI API:" in l for l in lines), "".join(lines)
    yield proc, f"http://127.0.0.1:{port}/v1"
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def test_openai_client_against_up(up):
    import openai

    _, url = up
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].finish_reason in ("stop", "length")
    stream = client.completions.create(model=model, prompt="Hello", max_tokens=6, stream=True, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert sum(1 for c in stream if c.choices and c.choices[0].text is not None) >= 1
    two = client.completions.create(model=model, prompt="Hello", max_tokens=4, n=2, extra_body={"ignore_eos": True})
    assert len(two.choices) == 2
    base = client.completions.create(model=model, prompt="Count:", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[10:12]
    cut = client.completions.create(model=model, prompt="Count:", max_tokens=20, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == base[: base.index(stop)] and cut.finish_reason == "stop"
    import concurrent.futures

    def one(i):
        return client.completions.create(model=model, prompt=f"q{i}", max_tokens=5,
                                         extra_body={"ignore_eos": True}).usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(64), timeout=240)) == [5] * 64


def test_hostile_requests_get_4xx_and_cluster_still_serves(up):
    import httpx

    _, url = up
    bodies = [b"{not json", b'{"model": "x"}', b"\xff\xfe\xfd", b"[]",
              json.dumps({"model": "tiny", "prompt": "a", "max_tokens": -1}).encode(),
              json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 10**9}).encode(),
              json.dumps({"model": "nope", "prompt": "a"}).encode(),
              json.dumps({"model": "tiny", "prompt": [5] * 5000}).encode(),
              json.dumps({"model": "tiny", "prompt": "a", "temperature": "hot"}).encode()]
    with httpx.Client(timeout=30) as http:
        model = http.get(f"{url}/models").json()["data"][0]["id"]
        for i in range(1000):  # bounded
            body = bodies[i % len(bodies)].replace(b'"tiny"', json.dumps(model).encode())
            r = http.post(f"{url}/completions", content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            assert "message" in r.json()["error"]
        ok = http.post(f"{url}/completions", json={"model": model, "prompt": "fine", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_a_real_prometheus_scrapes_the_cluster(up, tmp_path):
    """Prometheus (Debian's package, installed by `make test`) on 127.0.0.1 scrapes `/metrics` of the
    running cluster every second: the series a dashboard reads are there, with their labels."""
    import openai

    _, url = up
    proc, port = start_prometheus(tmp_path, [f"127.0.0.1:{urllib.parse.urlsplit(url).port}"])
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for i in range(4):
            client.completions.create(model=model, prompt=f"scraped {i}", max_tokens=4, extra_body={"ignore_eos": True})
        wanted = {
            "scraped": 'up{job="llm-cluster"} == 1',
            # a 1P1D request's first token is its prefill instance's, the tokens after it its decode instance's
            "ttft": f'sum(llm_cluster_time_to_first_token_seconds_count{{model="{model}", pool="prefill"}}) >= 4',
            "itl": f'sum(llm_cluster_inter_token_latency_seconds_count{{model="{model}", pool="decode"}}) >= 12',
            "kv usage per instance": "llm_cluster_kv_cache_usage_ratio",
            "pools": "llm_cluster_pool_size",
            "p50 ttft": "histogram_quantile(0.5, sum by (le) (llm_cluster_time_to_first_token_seconds_bucket))",
        }
        found = until_answered(port, wanted, timeout_s=60)
        assert set(found) == set(wanted), (set(wanted) - set(found), (tmp_path / "prometheus.log").read_text()[-2000:])
        instances = {(r["metric"]["pool"], r["metric"]["instance"]) for r in found["kv usage per instance"]}
        assert {pool for pool, _ in instances} == {"prefill", "decode"} and all(i for _, i in instances)
        sizes = {r["metric"]["pool"]: float(r["value"][1]) for r in found["pools"]}
        assert {pool: size for pool, size in sizes.items() if size} == {"prefill": 1.0, "decode": 1.0}, sizes
        assert 0 < float(found["p50 ttft"][0]["value"][1]) < 60
        # every panel of the dashboards: tests/dashboards/test_live.py
    finally:
        stop(proc, timeout_s=10)


def test_ctrl_c_shuts_down_cleanly(up):
    proc, _ = up
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "llm-cluster stopped." in out
