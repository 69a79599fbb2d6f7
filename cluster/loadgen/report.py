"""What a load run measured: per-request results in, a `Summary`, a table, JSON and PNG plots out.

  (1) the load generator (`cluster.loadgen.load`) hands back one `RequestResult` per request sent;
  (2) `summarize` turns them and the run's wall time into a `Summary`: counts, request and token
      throughput, goodput, and mean/median/p90/p95/p99 of TTFT, TPOT, ITL and E2E in ms;
  (3) `format_table` prints it; `to_jsonable` makes it (and the args) strict JSON;
  (4) `plot_cdfs` draws latency CDFs of one or more runs, `plot_sweep` goodput vs request rate
      (matplotlib, Agg backend, imported only when a plot is asked for).

Definitions (vLLM's `bench serve`):
  TTFT  = first content chunk - request sent
  ITL   = gaps between successive content chunks; a chunk of k tokens counts as k gaps of gap/k
  E2E   = last byte - request sent
  TPOT  = (E2E - TTFT) / (output_tokens - 1), defined for output_tokens > 1 (else 0 for goodput)
  goodput = completed requests with TTFT <= slo_ttft_ms AND TPOT <= slo_tpot_ms, per second of the run;
            an SLO left unset (None) holds for every request.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)
REJECTED_STATUSES = (429, 503)  # the server said "not now" (overloaded / draining): counted apart from failures


@dataclass
class RequestResult:
    """One request as the client saw it; times are seconds on the client's monotonic clock."""

    ok: bool = False  # a full stream ending in [DONE] with no error event
    status: int | None = None  # HTTP status; None if no response came (connection error, timeout)
    error: str = ""
    num_prompt_tokens: int = 0  # the server's usage count when given, else the prompt as built
    num_output_tokens_asked: int = 0
    num_output_tokens: int = 0  # the server's usage count when given, else the tokens seen in chunks
    start_s: float = 0.0  # when it was sent, from the start of the run
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        return self.status in REJECTED_STATUSES

    @property
    def tpot_s(self) -> float | None:
        return tpot_s(self.e2e_s, self.ttft_s, self.num_output_tokens)


def tpot_s(e2e_s: float, ttft_s: float, num_output_tokens: int) -> float | None:
    """Time per output token after the first; None when there is no second token."""
    if num_output_tokens <= 1:
        return None
    return (e2e_s - ttft_s) / (num_output_tokens - 1)


@dataclass(frozen=True)
class LatencyStats:
    """One latency's distribution in ms; every field None when nothing was measured."""

    mean_ms: float | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None

    @classmethod
    def of(cls, values_s: list[float]) -> "LatencyStats":
        if not values_s:
            return cls()
        ms = np.asarray(values_s, dtype=np.float64) * 1000.0
        median, p90, p95, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))  # linear interpolation
        return cls(float(ms.mean()), median, p90, p95, p99)


@dataclass(frozen=True)
class Summary:
    num_sent: int
    num_completed: int
    num_rejected: int  # HTTP 429 / 503
    num_failed: int  # any other failure
    duration_s: float
    total_input_tokens: int  # of completed requests
    total_output_tokens: int
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    total_token_throughput: float  # (input + output) tokens per second
    num_good: int  # completed requests meeting every SLO
    goodput: float  # num_good per second
    goodput_fraction: float  # num_good / num_sent: failed and rejected requests miss the SLO
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats


def meets_slo(result: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if not result.ok:
        return False
    tpot_ms = (result.tpot_s or 0.0) * 1000.0  # one output token: no TPOT, nothing to miss (as vLLM)
    return ((slo_ttft_ms is None or result.ttft_s * 1000.0 <= slo_ttft_ms)
            and (slo_tpot_ms is None or tpot_ms <= slo_tpot_ms))


def summarize(results: list[RequestResult], duration_s: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> Summary:
    done = [r for r in results if r.ok]
    num_rejected = sum(1 for r in results if not r.ok and r.rejected)
    num_good = sum(1 for r in results if meets_slo(r, slo_ttft_ms, slo_tpot_ms))
    num_in = sum(r.num_prompt_tokens for r in done)
    num_out = sum(r.num_output_tokens for r in done)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return Summary(
        num_sent=len(results), num_completed=len(done), num_rejected=num_rejected,
        num_failed=len(results) - len(done) - num_rejected, duration_s=duration_s,
        total_input_tokens=num_in, total_output_tokens=num_out,
        request_throughput=len(done) * per_s, output_throughput=num_out * per_s,
        total_token_throughput=(num_in + num_out) * per_s,
        num_good=num_good, goodput=num_good * per_s, goodput_fraction=num_good / len(results) if results else 0.0,
        slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
        ttft=LatencyStats.of([r.ttft_s for r in done]),
        tpot=LatencyStats.of([r.tpot_s for r in done if r.tpot_s is not None]),
        itl=LatencyStats.of([gap for r in done for gap in r.itl_s]),
        e2e=LatencyStats.of([r.e2e_s for r in done]),
    )


def format_table(summary: Summary, title: str = "Serving Benchmark Result") -> str:
    s = summary
    rows: list[tuple[str, object] | str] = [
        ("Requests sent", s.num_sent), ("Successful requests", s.num_completed),
        ("Rejected requests (429/503)", s.num_rejected), ("Failed requests", s.num_failed),
        ("Benchmark duration (s)", s.duration_s), ("Total input tokens", s.total_input_tokens),
        ("Total generated tokens", s.total_output_tokens), ("Request throughput (req/s)", s.request_throughput),
        ("Output token throughput (tok/s)", s.output_throughput),
        ("Total token throughput (tok/s)", s.total_token_throughput),
        f"SLO: {_slo_text(s)}", ("Goodput (req/s)", s.goodput),
        ("Requests meeting SLOs (%)", 100.0 * s.goodput_fraction),
    ]
    for name, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency")):
        stats: LatencyStats = getattr(s, name)
        rows.append(label)
        rows += [(f"{stat.removesuffix('_ms').capitalize()} {name.upper()} (ms)", getattr(stats, stat))
                 for stat in ("mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms")]
    lines = [f"{f' {title} ':=^56}"]
    for row in rows:
        lines.append(f"{f' {row} ':-^56}" if isinstance(row, str) else f"{row[0] + ':':<40}{_fmt(row[1]):>16}")
    lines.append("=" * 56)
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def to_jsonable(value: object) -> object:
    """Dataclasses, dicts and lists as strict JSON values: inf -> "inf", NaN -> None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # enums, paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(runs: dict[str, list[RequestResult]], path: str) -> str:
    """Empirical CDFs of TTFT, TPOT and ITL (ms), one line per run (label -> results)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metrics = (("TTFT", lambda r: [r.ttft_s]), ("TPOT", lambda r: [] if r.tpot_s is None else [r.tpot_s]),
               ("ITL", lambda r: r.itl_s))
    for ax, (name, values_of) in zip(axes, metrics):
        for label, results in runs.items():
            ms = np.sort([v * 1000.0 for r in results if r.ok for v in values_of(r)])
            if len(ms):
                ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=label)
        ax.set(title=f"{name} CDF", xlabel=f"{name} (ms)", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    return _save(fig, plt, path)


def plot_sweep(rates: list[float], summaries: list[Summary], path: str) -> str:
    """Goodput and request throughput (req/s) against the offered request rate (evenly spaced, as swept)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    shown = list(range(len(rates)))  # rates are usually geometric and may end in inf: one slot each
    ax.plot(shown, [s.request_throughput for s in summaries], "o--", label="throughput (completed req/s)")
    ax.plot(shown, [s.goodput for s in summaries], "o-", label="goodput (req/s meeting SLOs)")
    ax.set(title=f"Goodput vs request rate (SLO {_slo_text(summaries[0])})", xlabel="request rate (req/s)",
           ylabel="req/s")
    ax.set_xticks(shown, [f"{r:g}" for r in rates])
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)


def _slo_text(summary: Summary) -> str:
    bounds = [f"{name}<={ms:g}ms" for name, ms in (("TTFT", summary.slo_ttft_ms), ("TPOT", summary.slo_tpot_ms))
              if ms is not None]
    return ", ".join(bounds) or "none"


def _save(fig, plt, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
