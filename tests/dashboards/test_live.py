"""Every panel of the dashboards against a real Prometheus scraping a real `llm-cluster up` under load.

  1. `llm-cluster up` (a subprocess, 1P1D, the tiny CPU model, the autoscaler acting: the TTFT target
     is one the load misses, so it adds a prefill instance and times the scale-out) and Debian's
     Prometheus on 127.0.0.1, scraping it every second and evaluating dashboards/rules for the
     cluster's own `slo:` every second;
  2. a short load: streamed completions from a few threads for ~40 s, and some invalid requests (refusals);
  3. every query of every panel, Grafana's variables set, returns series: the SLO's, the autoscaler's
     (desired / pending / actual, decisions, predicted vs observed, scale-out time, GPUs) and the rest;
  4. the SLO dashboard is drawn from the same queries over the run (dashboards/render.py) to a PNG;
     LLM_CLUSTER_DOCS_IMG=1 writes it to docs/img/slo-dashboard.png.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cluster.config import SloConfig
from dashboards.__main__ import dashboards, rules_text
from dashboards.render import render_png
from dashboards.slo import SloText
from tests.dashboards.test_generated import panel_queries
from tests.procs import stop
from tests.prometheus import query_range, start_prometheus, until_answered
from tests.runtime.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# a TTFT target the tiny CPU model misses at any load (its first token takes ~10 ms through HTTP; a bucket boundary): the budget
# burns and the autoscaler adds a prefill instance
SLO = SloConfig(ttft_s=0.0025, itl_s=0.05, percentile=95, objective_percent=99)
AUTOSCALER_METRIC = "llm_cluster_autoscaler_"
LOAD_S = 40
ADMIN_KEY = "live-admin-key"


@pytest.fixture(scope="module")
def cluster_up(tiny_model, tmp_path_factory):
    port = free_port()
    config = tmp_path_factory.mktemp("live") / "cluster.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "engine": {"model": {"path": tiny_model}},
        "prefill": {"instances": 1, "num_cpus_per_rank": 0.25}, "decode": {"instances": 1, "num_cpus_per_rank": 0.25},
        "api": {"port": port, "admin_keys": [ADMIN_KEY]}, "slo": SLO.__dict__,
        "autoscale": {"enabled": True, "mode": "act", "interval_s": 2.0, "role_flip": False,
                      "prefill": {"min_instances": 1, "max_instances": 2},
                      "decode": {"min_instances": 1, "max_instances": 1}}}))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # bounded
        line = proc.stdout.readline()
        lines.append(line)
        if "OpenAI API:" in line or proc.poll() is not None:
            break
    assert any("OpenAI API:" in l for l in lines), "".join(lines)
    yield port
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _load(url: str, seconds: float) -> int:
    """Streams from 3 threads for `seconds` (the second half at twice the pace), and 5 invalid requests."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    end = time.monotonic() + seconds
    done = []

    def worker(i: int) -> None:
        n = 0
        while time.monotonic() < end:  # bounded by time
            stream = client.completions.create(model=model, prompt=f"load {i} {n} " * (1 + n % 5), max_tokens=8,
                                               stream=True, extra_body={"ignore_eos": True})
            for _ in stream:
                pass
            n += 1
            time.sleep(0.4 if end - time.monotonic() > seconds / 2 else 0.1)
        done.append(n)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    with httpx.Client(timeout=10) as http:
        for _ in range(5):
            assert http.post(f"{url}/completions", json={"model": model, "prompt": "x", "max_tokens": -1}).status_code == 400
    for t in threads:
        t.join(timeout=seconds + 60)
    return sum(done)


def _autoscaler_status(port: int) -> str:
    import httpx

    try:
        status = httpx.get(f"http://127.0.0.1:{port}/admin/autoscaler", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    except (httpx.HTTPError, ValueError) as exc:
        return repr(exc)
    acts = [d for d in status["decisions"] if d["direction"] != "hold"]
    return json.dumps({"actions": acts[:10], "scale_outs": status["scale_outs"][:5],
                       "last": status["decisions"][:4]})[-4000:]


def test_every_panel_returns_data_and_the_slo_dashboard_is_drawn(cluster_up, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(SloText.of(SLO)))
    proc, port = start_prometheus(tmp_path, [f"127.0.0.1:{cluster_up}"], rule_files=(str(rules),))
    try:
        started = time.time()
        assert _load(f"http://127.0.0.1:{cluster_up}/v1", LOAD_S) >= 30
        # the scale-out panel has data once the added instance serves: on a loaded 2-core box its start can
        # outlast the load, so wait for it (bounded) before asking every panel
        scaled_out = until_answered(port, {"scale-out": "llm_cluster_autoscaler_scale_out_seconds_count > 0"},
                                    timeout_s=180)
        assert scaled_out, ("no scale-out finished", _autoscaler_status(cluster_up))
        queries = {f"{name}: {title}": expr for name, board in dashboards().items()
                   for title, expr in panel_queries(board).items()}
        answered = until_answered(port, queries, timeout_s=30)
        missing = set(queries) - set(answered)
        assert not missing, (sorted(missing), (tmp_path / "prometheus.log").read_text()[-2000:])
        assert any(AUTOSCALER_METRIC in expr for expr in queries.values())
        scaled = until_answered(port, {"up": 'llm_cluster_autoscaler_decisions_total{direction="up"} > 0'}, timeout_s=5)
        assert scaled, "the autoscaler never scaled up"
        # the SLO dashboard as a picture, from the same queries over the run
        minutes = (time.time() - started) / 60 + 0.2
        board = dashboards()["llm-cluster-slo.json"]

        def fetch(expr: str):
            for name, value in {"$__rate_interval": "10s", "$model": ".+"}.items():
                expr = expr.replace(name, value)
            return [(r["metric"], [float(t) for t, _ in r["values"]], [float(v) for _, v in r["values"]])
                    for r in query_range(port, expr, minutes)]

        png = tmp_path / "slo-dashboard.png"
        render_png(board, fetch, str(png))
        assert png.stat().st_size > 20_000
        if os.environ.get("LLM_CLUSTER_DOCS_IMG") == "1":
            os.makedirs(os.path.join(ROOT, "docs", "img"), exist_ok=True)
            render_png(board, fetch, os.path.join(ROOT, "docs", "img", "slo-dashboard.png"))
    finally:
        stop(proc, timeout_s=10)
