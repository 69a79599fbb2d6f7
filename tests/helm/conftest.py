"""Render the chart with the real helm (tests/deploy/tools.py installs it) and hand out its objects."""
from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from tests.deploy.tools import helm_binary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "llm-cluster")
VALUES = sorted(os.path.join(CHART, "ci", name) for name in os.listdir(os.path.join(CHART, "ci")))
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the chart's kubeVersion floor, and the newest schemas we have


def helm(*args: str) -> subprocess.CompletedProcess:
    if not os.path.exists(helm_binary()):
        pytest.fail("helm is missing: run `make install-test` (tests/deploy/tools.py)", pytrace=False)
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)


def render(values_file: str | None = None, *sets: str) -> list[dict]:
    args = ["template", "rel", CHART, "--namespace", "serving"]
    if values_file:
        args += ["-f", values_file]
    for s in sets:
        args += ["--set", s]
    out = helm(*args)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def values_of(values_file: str) -> dict:
    """The chart's defaults overlaid with a values file (as helm merges them, maps key by key)."""
    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return out

    with open(os.path.join(CHART, "values.yaml")) as f, open(values_file) as g:
        return merge(yaml.safe_load(f), yaml.safe_load(g) or {})


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """values file name -> the objects `helm template` renders with it."""
    return {os.path.basename(path): render(path) for path in VALUES}
