"""The SLO overview: is the cluster keeping its promise, and how fast is it spending the budget?

Rows, top to bottom: the 30-day error budget left and the multi-window burn rates the alerts fire on
(dashboards/rules.py records them); attainment against the `slo:` targets and goodput; latency
quantiles with their targets; traffic, finishes and refusals. Targets, objective and budget come from
the rules' constant series, so this JSON is the same for every deployment.
"""
from __future__ import annotations

from dashboards.grafana import M, RATE, Panel, Query, dashboard, link
from dashboards.rules import NS, errors
from dashboards.slo import BURN_ALERTS, SLIS

BUDGET = f"on() group_left() {NS}slo_error_budget:ratio"


def _burn(window: str) -> Query:
    return Query(f"{errors(window)}{{{M}}} / {BUDGET}", f"{{{{model}}}} {{{{slo}}}} {window}")


def _quantiles(metric: str, quantiles: tuple[float, ...], by: str = "model") -> list[Query]:
    return [Query(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{M}}}[{RATE}])))",
                  f"p{round(q * 100)} " + " ".join(f"{{{{{label}}}}}" for label in by.split(", ")))
            for q in quantiles]


def _target(slo: str) -> Query:
    return Query(f'{NS}slo_target:seconds{{slo="{slo}"}}', "target")


def build() -> dict:
    page, ticket = BURN_ALERTS
    budget = [
        Panel("Error budget left (30 d)", [Query(f"1 - {errors('30d')}{{{M}}} / {BUDGET}", "{{model}} {{slo}}")],
              kind="stat", unit="percentunit", width=6, thresholds=[(None, "red"), (0, "orange"), (0.25, "green")],
              description="Share of the 30-day error budget (1 - objective) not yet spent, per SLI."),
        *(Panel(f"Burn rate: {a.long_window} and {a.short_window} ({a.severity} above {a.factor}x)",
                [_burn(a.long_window), _burn(a.short_window)], width=9,
                thresholds=[(None, "green"), (a.factor, "red")],
                description=f"Error ratio over the error budget: 1 spends it in exactly 30 days. The "
                            f"{a.severity} alert fires when both windows are above {a.factor}.")
          for a in (page, ticket)),
    ]
    attainment = [
        Panel("SLO attainment: share within target (5 m)",
              [Query(f"1 - {errors('5m')}{{{M}}}", "{{model}} {{slo}}"),
               Query(f"{NS}slo_percentile:ratio", "percentile target"), Query(f"{NS}slo_objective:ratio", "objective")],
              unit="percentunit", max_value=1,
              description="Requests whose TTFT, and tokens whose ITL, met the slo: target."),
        Panel("Goodput: requests/s meeting both targets",
              [Query(f"{NS}goodput:rate5m{{{M}}}", "goodput {{model}}"),
               Query(f"sum by (model) (rate({SLIS['ttft']}_count{{{M}}}[{RATE}]))", "all requests {{model}}")],
              unit="reqps", description="Requests/s whose first token met the TTFT target, times the share "
                                        "of tokens within the ITL target (the two taken as independent)."),
    ]
    latency = [
        Panel("Time to first token", [*_quantiles(SLIS["ttft"], (0.5, 0.9, 0.99)), _target("ttft")], unit="s"),
        Panel("Inter-token latency", [*_quantiles(SLIS["itl"], (0.5, 0.9, 0.99)), _target("itl")], unit="s"),
        Panel("End-to-end latency", _quantiles("llm_cluster_e2e_request_latency_seconds", (0.5, 0.99)), unit="s"),
        Panel("Queue time p99 by pool", _quantiles("llm_cluster_request_queue_time_seconds", (0.99,), "pool"),
              unit="s", description="Submitted to an instance -> first scheduled."),
    ]
    traffic = [
        Panel("Throughput", [
            Query(f"sum by (model) (rate(llm_cluster_prompt_tokens_total{{{M}}}[{RATE}]))", "prompt tokens/s {{model}}"),
            Query(f"sum by (model) (rate(llm_cluster_generation_tokens_total{{{M}}}[{RATE}]))",
                  "generated tokens/s {{model}}")], unit="short"),
        Panel("Requests finished by reason", [Query(
            f"sum by (finish_reason) (rate(llm_cluster_requests_finished_total{{{M}}}[{RATE}]))", "{{finish_reason}}")],
            unit="reqps"),
        Panel("Requests refused by reason (429/503 under overload, 4xx invalid)", [Query(
            f"sum by (reason) (rate(llm_cluster_requests_rejected_total{{{M}}}[{RATE}]))", "{{reason}}")],
            unit="reqps", optional="no request refused yet: the series appears with the first refusal"),
    ]
    return dashboard("llm-cluster-slo", "llm-cluster: SLOs",
                     "Attainment, error budget and burn rates of the slo: targets, latency, goodput and traffic.",
                     [("Error budget and burn rates", budget), ("Attainment", attainment),
                      ("Latency", latency), ("Traffic", traffic)],
                     links=(link("Pools and autoscaler", "llm-cluster-pools"),))
