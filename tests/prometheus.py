"""A real Prometheus for tests (Debian's, installed by `make install-test`) and asking it PromQL.

  1. `start_prometheus(tmp, targets, rule_files)` runs it on a free 127.0.0.1 port, scraping each
     target's `/metrics` every second and evaluating rules every second;
  2. `until_answered(port, queries, timeout_s)` asks each query until it returns series: a malformed
     query fails at once (Prometheus answers it with an error), 503 (still starting) is asked again;
  3. `query_range` returns a query's points over the last minutes (for pictures).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.runtime.conftest import free_port


def start_prometheus(tmp_path, targets: list[str], rule_files: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run `make test` (it installs it), "
                    "or `apt-get install -y prometheus`", pytrace=False)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": list(rule_files),
        "scrape_configs": [{"job_name": "llm-cluster", "metrics_path": "/metrics",
                            "static_configs": [{"targets": targets}]}]}))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=log)
    log.close()
    return proc, port


def _get(port: int, path: str, params: dict) -> list[dict]:
    url = f"http://127.0.0.1:{port}{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def prometheus_query(port: int, query: str) -> list[dict]:
    return _get(port, "/api/v1/query", {"query": query})


def query_range(port: int, query: str, minutes: float, step_s: float = 2.0) -> list[dict]:
    end = time.time()
    return _get(port, "/api/v1/query_range", {"query": query, "start": end - 60 * minutes, "end": end, "step": step_s})


def until_answered(port: int, queries: dict[str, str], timeout_s: float) -> dict[str, list]:
    """name -> the query's result, for those that returned series before `timeout_s`."""
    found: dict[str, list] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(found) < len(queries):  # bounded
        for name, query in queries.items():
            if name in found:
                continue
            try:
                result = prometheus_query(port, query)
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
