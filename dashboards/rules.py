"""Prometheus recording and alert rules for the SLO: one function, rendered for any `slo:` block.

  1. Constants: the `slo:` block as series (`llm_cluster:slo_target:seconds{slo}`,
     `llm_cluster:slo_objective:ratio`, `..._error_budget:ratio`, `..._percentile:ratio`), so the
     dashboards draw targets and budgets from the same file and carry no number of their own.
  2. Error ratios: per SLI (`slo="ttft"|"itl"`) and model, the share of events over target in each of
     WINDOWS, `llm_cluster:slo_errors:ratio_rate5m` ...: 1 - (bucket at the target) / (all). A window with
     no events has no sample (not NaN), so no alert and no dashboard line reads 0/0.
  3. The budget's period: the 5 m ratio averaged over 30 days (Sloth's way: cheap, time-weighted), and
     goodput: requests/s that met both targets, as the API counted each one (`requests_within_slo`).
  4. Alerts: multi-window, multi-burn-rate (slo.BURN_ALERTS): both windows above factor x budget.
"""
from __future__ import annotations

from dashboards.slo import BUDGET_WINDOW, BURN_ALERTS, SLI_TITLES, SLIS, WINDOWS, SloText

NS = "llm_cluster:"  # recorded series: level:metric:operations, as Prometheus' naming guide has it


def errors(window: str) -> str:
    return f"{NS}slo_errors:ratio_rate{window}"


def error_ratio_expr(slo: str, window: str, text: SloText) -> str:
    metric = SLIS[slo]
    return (f'1 - (sum by (model) (rate({metric}_bucket{{le="{text.le(slo)}"}}[{window}]))'
            f" / (sum by (model) (rate({metric}_count[{window}])) > 0))")


def _record(name: str, expr: str, **labels: str) -> dict:
    return {"record": name, "expr": expr, **({"labels": labels} if labels else {})}


def recording_rules(text: SloText) -> list[dict]:
    rules = [
        *(_record(f"{NS}slo_target:seconds", f"vector({text.le(slo)})", slo=slo) for slo in SLIS),
        _record(f"{NS}slo_percentile:ratio", f"vector({text.percentile})"),
        _record(f"{NS}slo_objective:ratio", f"vector({text.objective})"),
        _record(f"{NS}slo_error_budget:ratio", f"vector({text.error_budget})"),
    ]
    for slo in SLIS:
        rules += [_record(errors(w), error_ratio_expr(slo, w, text), slo=slo) for w in WINDOWS]
        rules.append(_record(errors(BUDGET_WINDOW), f'avg_over_time({errors("5m")}{{slo="{slo}"}}[{BUDGET_WINDOW}])',
                             slo=slo))
    rules.append(_record(f"{NS}goodput:rate5m", "sum by (model) (rate(llm_cluster_requests_within_slo_total[5m]))"))
    return rules


def alert_rules(text: SloText) -> list[dict]:
    rules = []
    for slo, title in SLI_TITLES.items():
        for burn in BURN_ALERTS:
            threshold = f"({burn.factor} * {text.error_budget})"
            rules.append({
                "alert": f"LLMCluster{title}ErrorBudgetBurn",
                "expr": (f'{errors(burn.long_window)}{{slo="{slo}"}} > {threshold}'
                         f' and {errors(burn.short_window)}{{slo="{slo}"}} > {threshold}'),
                "for": burn.for_,
                "labels": {"severity": burn.severity, "slo": slo},
                "annotations": {
                    "summary": f"{title} error budget of {{{{ $labels.model }}}} burning over {burn.factor}x",
                    "description": (f"Over {burn.factor} x {text.error_budget} of {title} events missed the "
                                    f"{text.le(slo)} s target in both the last {burn.long_window} and "
                                    f"{burn.short_window}: at that rate the {BUDGET_WINDOW} error budget is "
                                    f"gone in {30 * 24 / burn.factor:.0f} h."),
                },
            })
    return rules


def rule_groups(text: SloText) -> dict:
    """The rule file's body (`groups:`), also a PrometheusRule's `spec`."""
    return {"groups": [{"name": "llm-cluster-slo-recording", "rules": recording_rules(text)},
                       {"name": "llm-cluster-slo-alerts", "rules": alert_rules(text)}]}
