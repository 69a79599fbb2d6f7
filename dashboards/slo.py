"""The SLO as the dashboards and rules see it: the `slo:` block as text for PromQL, its windows and burns.

  1. `SloText.of(SloConfig)` turns the cluster's `slo:` block (cluster/config/autoscale.py) into the
     strings the rules need: each target as the `le` label of its histogram bucket (prometheus_client's
     own float formatting, so `2.0` and not `2`), the objective and its error budget as ratios.
  2. `SloText.slots()` is the same with `${name}` slots in place of the values: the Helm chart fills
     them from its `slo:` values (helm/llm-cluster/templates/_slo.tpl), so one file serves both.
  3. A target must be a bucket boundary of `cluster.metrics.LATENCY_BUCKETS_S`: the share of requests
     under it is then exact (bucket count / total), not interpolated.
  4. `SLIS` names the histogram of each SLI; `WINDOWS` and `BURN_ALERTS` are the Google SRE workbook's
     multi-window, multi-burn-rate alerting (page: 14.4x over 1 h and 5 m; ticket: 6x over 6 h and 30 m).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from prometheus_client.utils import floatToGoString

from cluster.config import SloConfig
from cluster.metrics import LATENCY_BUCKETS_S, PREFIX

SLIS = {  # slo label -> the histogram whose buckets count good events (a request's TTFT, a token's ITL)
    "ttft": PREFIX + "time_to_first_token_seconds",
    "itl": PREFIX + "inter_token_latency_seconds",
}
SLI_TITLES = {"ttft": "TTFT", "itl": "ITL"}
WINDOWS = ("5m", "30m", "1h", "6h")  # error ratios recorded over each
BUDGET_WINDOW = "30d"  # the objective's period: error budget left is counted over it


@dataclass(frozen=True)
class BurnAlert:
    """Fire when the error ratio over both windows exceeds `factor` times the error budget."""

    severity: str  # page | ticket
    long_window: str
    short_window: str
    factor: float  # burn rate: 14.4 spends 2% of a 30-day budget in 1 h, 6 spends 5% in 6 h
    for_: str  # how long the condition holds before it fires


BURN_ALERTS = (BurnAlert("page", "1h", "5m", 14.4, "2m"), BurnAlert("ticket", "6h", "30m", 6.0, "15m"))


def bucket_le(owner: str, seconds: float) -> str:
    """The `le` label of the bucket whose upper bound is `seconds`; a target between buckets is an error."""
    if float(seconds) not in LATENCY_BUCKETS_S:
        raise ValueError(f"{owner}={seconds!r} must be a latency bucket boundary: one of "
                         f"{', '.join(floatToGoString(b) for b in LATENCY_BUCKETS_S)}")
    return floatToGoString(float(seconds))


@dataclass(frozen=True)
class SloText:
    """The `slo:` block's values as PromQL text (or `${field}` slots the chart fills)."""

    ttft_le: str  # "2.0": the TTFT target as its bucket's le label (and as a number: the same text)
    itl_le: str
    percentile: str  # the share meeting each target the autoscaler holds, 0..1
    objective: str  # the share meeting each target over BUDGET_WINDOW, 0..1
    error_budget: str  # 1 - objective

    @classmethod
    def of(cls, slo: SloConfig) -> SloText:
        objective = slo.objective_percent / 100
        return cls(ttft_le=bucket_le("slo.ttft_s", slo.ttft_s), itl_le=bucket_le("slo.itl_s", slo.itl_s),
                   percentile=repr(round(slo.percentile / 100, 6)), objective=repr(round(objective, 6)),
                   error_budget=repr(round(1 - objective, 6)))

    @classmethod
    def slots(cls) -> SloText:
        return cls(**{f.name: "${" + f.name + "}" for f in fields(cls)})

    def le(self, slo: str) -> str:
        return getattr(self, f"{slo}_le")
