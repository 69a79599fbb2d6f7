"""The SLO rules under promtool: they load, and each burn-rate alert fires when the budget burns and
stays quiet when it does not (`promtool test rules` on synthetic series, one minute a sample)."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from cluster.config import SloConfig
from dashboards.__main__ import rules_text
from dashboards.rules import errors
from dashboards.slo import SloText

SLO = SloConfig(ttft_s=0.5, itl_s=0.05, objective_percent=99.0)  # budget 1%: page above 14.4%, ticket above 6%
METRIC = {"ttft": "llm_cluster_time_to_first_token_seconds", "itl": "llm_cluster_inter_token_latency_seconds"}
LE = {"ttft": "0.5", "itl": "0.05"}
NAME = {"ttft": "LLMClusterTTFTErrorBudgetBurn", "itl": "LLMClusterITLErrorBudgetBurn"}


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: `make install-test` installs Debian's prometheus", pytrace=False)
    return binary


def _series(slo: str, phases: list[tuple[int, int]]) -> list[dict]:
    """1,000 events a minute; `phases`: (minutes, bad events a minute) one after another."""
    labels = 'model="m", pool="p", instance="i0"'
    good, total = [0], [0]
    for minutes, bad in phases:
        for _ in range(minutes):
            good.append(good[-1] + 1000 - bad)
            total.append(total[-1] + 1000)
    values = lambda xs: " ".join(str(x) for x in xs)  # noqa: E731
    return [{"series": f'{METRIC[slo]}_bucket{{{labels}, le="{LE[slo]}"}}', "values": values(good)},
            {"series": f'{METRIC[slo]}_count{{{labels}}}', "values": values(total)}]


def _alerts(rules: dict, slo: str, *severities: str) -> list[dict]:
    """The alerts of `slo` with these severities as promtool must see them: labels and annotations."""
    fired = []
    for rule in rules["groups"][1]["rules"]:
        if rule["labels"]["slo"] == slo and rule["labels"]["severity"] in severities:
            fired.append({"exp_labels": {"model": "m", **rule["labels"]},
                          "exp_annotations": {k: v.replace("{{ $labels.model }}", "m")
                                              for k, v in rule["annotations"].items()}})
    return fired


CASES = {  # name -> (phases: (minutes, bad events of 1,000 a minute), eval minute, severities expected to fire)
    "heavy burn (20%) pages and tickets": ([(60, 200)], 30, ("page", "ticket")),
    "slow burn (10%) tickets only": ([(60, 100)], 40, ("ticket",)),
    "within budget (0.5%) is quiet": ([(60, 5)], 59, ()),
    "burnt for an hour, healthy for 15 min: the 5 m window clears the page": ([(60, 300), (15, 0)], 74, ("ticket",)),
    "a one-minute outage does not page (the 1 h window stays low)": ([(60, 0), (1, 1000)], 61, ()),
}


def _test_file(rules_path: str, rules: dict) -> dict:
    tests = []
    for slo in ("ttft", "itl"):
        for name, (phases, minute, fired) in CASES.items():
            tests.append({"interval": "1m", "input_series": _series(slo, phases), "name": f"{slo}: {name}",
                          "alert_rule_test": [{"eval_time": f"{minute}m", "alertname": NAME[slo],
                                               "exp_alerts": _alerts(rules, slo, *fired)}]})
        # the recorded ratio itself: 250 of 1,000 over target -> 0.25
        tests.append({"interval": "1m", "input_series": _series(slo, [(30, 250)]), "name": f"{slo}: recorded ratio",
                      "promql_expr_test": [{"expr": f'{errors("5m")}{{slo="{slo}"}}', "eval_time": "20m",
                                            "exp_samples": [{"labels": f'{errors("5m")}{{model="m", slo="{slo}"}}',
                                                             "value": 0.25}]}]})
    return {"rule_files": [rules_path], "evaluation_interval": "1m", "tests": tests}


def test_rules_pass_promtool_check(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(SloText.of(SLO)))
    out = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 20 rules found" in out.stdout


def test_burn_rate_alerts_fire_on_burn_and_stay_quiet_otherwise(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(SloText.of(SLO)))
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump(_test_file(str(rules), yaml.safe_load(rules.read_text()))))
    out = subprocess.run([_promtool(), "test", "rules", str(tests)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
