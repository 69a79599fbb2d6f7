"""The dashboards as files: generated from the code, valid PromQL, our conventions, Grafana's schema.

  1. what is committed under dashboards/ is what `python -m dashboards` makes (no hand edits);
  2. every panel's every query parses (promql-parser) once Grafana's variables are set, and keeps the
     house rules: a `model=~"$model"` filter on every selector of ours, `$__rate_interval` windows;
  3. the JSON type-checks against Grafana's own TypeScript types (npm `@grafana/schema`, `tsc --strict`),
     each dashboard as an object literal, so an unknown or mistyped key is an error. `AsJson<T>` reads
     the schema's string enums as the strings JSON holds (`ThresholdsMode.Absolute` is "absolute").
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from dashboards.__main__ import dashboards, generated, main
from tests.deploy.tools import npm_prefix

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AS_JSON = """type AsJson<T> = T extends string ? `${T}` : T extends number | boolean | null | undefined ? T
  : T extends Array<infer U> ? Array<AsJson<U>> : T extends object ? { [K in keyof T]: AsJson<T[K]> } : T;"""
VARIABLES = {"$__rate_interval": "1m", "$model": ".+", "$pool": ".+"}


def panel_queries(board: dict) -> dict[str, str]:
    """'<panel title> [refId]' -> the query with Grafana's variables set as a user's browser would."""
    queries = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            queries[f"{panel['title']} [{target['refId']}]"] = expr
    return queries


def test_committed_files_are_what_the_code_makes():
    assert main(["--check"]) == 0, "run `python -m dashboards` and commit the result"
    assert {os.path.basename(p) for p in generated()} >= {"llm-cluster-slo.json", "llm-cluster-pools.json"}


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_query_parses_and_keeps_the_house_rules(name):
    import promql_parser

    board = dashboards()[name]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert [v["name"] for v in board["templating"]["list"]][:2] == ["datasource", "model"]
    raw = {f"{p['title']} [{t['refId']}]": t["expr"] for p in board["panels"] for t in p.get("targets", [])}
    for title, expr in panel_queries(board).items():
        assert "$" not in expr, (title, expr)
        promql_parser.parse(expr)  # raises on invalid PromQL
        # every raw metric of ours is filtered by model; recorded constants (no model label) are not
        for selector in re.findall(r"(llm_cluster_\w+)(\{[^}]*\})?", raw[title]):
            assert 'model=~"$model"' in selector[1], (title, selector)
        windows = set(re.findall(r"\[([^\]]+)\]", raw[title]))
        assert windows <= {"$__rate_interval", "1h"}, (title, windows)  # 1h: scale-outs are rare events
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_dashboards_type_check_against_grafana_schema(tmp_path):
    tsc = os.path.join(npm_prefix(), "node_modules", ".bin", "tsc")
    if not os.path.exists(tsc) or shutil.which("node") is None:
        pytest.fail("tsc or @grafana/schema missing: run `make install-test` (tests/deploy/tools.py)", pytrace=False)
    lines = ['import type { Dashboard } from "@grafana/schema";', AS_JSON]
    for i, (name, board) in enumerate(sorted(dashboards().items())):
        lines.append(f"// {name}\nexport const dashboard{i}: AsJson<Dashboard> = {json.dumps(board, indent=1)};")
    (tmp_path / "dashboards.ts").write_text("\n".join(lines) + "\n")
    (tmp_path / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "module": "nodenext", "moduleResolution": "nodenext",
                            "skipLibCheck": True}, "files": ["dashboards.ts"]}))
    os.symlink(os.path.join(npm_prefix(), "node_modules"), tmp_path / "node_modules")
    out = subprocess.run([tsc, "-p", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_a_mistyped_dashboard_fails_the_type_check(tmp_path):
    """The check above can fail: a misspelt key and a string where a number goes are both refused."""
    tsc = os.path.join(npm_prefix(), "node_modules", ".bin", "tsc")
    if not os.path.exists(tsc):
        pytest.fail("tsc missing: run `make install-test`", pytrace=False)
    board = dict(dashboards()["llm-cluster-slo.json"])
    board["panels"] = [dict(board["panels"][1], gridPoss={"h": 8, "w": 12, "x": 0, "y": 0}), dict(board["panels"][2], id="3")]
    (tmp_path / "bad.ts").write_text(f'import type {{ Dashboard }} from "@grafana/schema";\n{AS_JSON}\n'
                                     f"export const bad: AsJson<Dashboard> = {json.dumps(board)};\n")
    (tmp_path / "tsconfig.json").write_text(json.dumps({"compilerOptions": {
        "strict": True, "noEmit": True, "module": "nodenext", "moduleResolution": "nodenext", "skipLibCheck": True},
        "files": ["bad.ts"]}))
    os.symlink(os.path.join(npm_prefix(), "node_modules"), tmp_path / "node_modules")
    out = subprocess.run([tsc, "-p", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "'\"gridPoss\"' does not exist" in out.stdout, out.stdout
    assert "Type 'string' is not assignable to type 'number'" in out.stdout, out.stdout
