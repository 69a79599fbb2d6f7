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


def _prometheus_query(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _until_answered(port: int, queries: dict[str, str], timeout_s: float) -> dict[str, list]:
    """name -> the query's result, for those that returned series before `timeout_s` (a malformed
    query fails at once: Prometheus answers it with an error; 503 is Prometheus starting up, asked again:
    a fresh-clone CI run got it for the first query)."""
    found: dict[str, list] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(found) < len(queries):  # bounded
        for name, query in queries.items():
            try:
                result = _prometheus_query(port, query)
            except urllib.error.HTTPError as exc:
                if exc.code != 503:
                    raise AssertionError(f"{name}: Prometheus refused {query!r}: {exc.read()[:300]!r}") from exc
                result = []  # listening, not ready yet
            except OSError:  # not listening yet
                result = []
            if result:
                found[name] = result
        time.sleep(0.5)
    return found


def _dashboard_queries() -> dict[str, str]:
    """Each query of examples/grafana/llm-cluster-slo.json, its variables set as a user would."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "grafana", "llm-cluster-slo.json")
    with open(path) as f:
        dashboard = json.load(f)
    values = {"$__rate_interval": "1m", "$model": ".+", "$ttft_slo": "0.5", "$itl_slo": "0.05"}
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in values.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, (panel["title"], expr)
            queries[f"{panel['title']} [{target['refId']}]"] = expr
    return queries


def test_a_real_prometheus_scrapes_the_cluster(up, tmp_path):
    """Prometheus (Debian's package, installed by `make test`) on 127.0.0.1 scrapes `/metrics` of the
    running cluster every second: the series a dashboard reads are there, with their labels."""
    import shutil

    import openai

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run `make test` (it installs it), "
                    "or `apt-get install -y prometheus`", pytrace=False)
    _, url = up
    api_port = urllib.parse.urlsplit(url).port
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "llm-cluster", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]}]}))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=log)
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
        found = _until_answered(port, wanted, timeout_s=60)
        assert set(found) == set(wanted), (set(wanted) - set(found), (tmp_path / "prometheus.log").read_text()[-2000:])
        instances = {(r["metric"]["pool"], r["metric"]["instance"]) for r in found["kv usage per instance"]}
        assert {pool for pool, _ in instances} == {"prefill", "decode"} and all(i for _, i in instances)
        sizes = {r["metric"]["pool"]: float(r["value"][1]) for r in found["pools"]}
        assert {pool: size for pool, size in sizes.items() if size} == {"prefill": 1.0, "decode": 1.0}, sizes
        assert 0 < float(found["p50 ttft"][0]["value"][1]) < 60
        # the Grafana dashboard shipped in examples/: every panel's query is valid PromQL, and every panel
        # but the refusals and preemptions (none may have happened in its window) shows data
        panels = _dashboard_queries()
        answered = _until_answered(port, panels, timeout_s=30)
        optional = {name for name in panels if name.startswith(("Requests refused", "Preemptions"))}
        assert set(panels) - optional <= set(answered), set(panels) - optional - set(answered)
    finally:
        stop(proc, timeout_s=10)
        log.close()


def test_ctrl_c_shuts_down_cleanly(up):
    proc, _ = up
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "llm-cluster stopped." in out
