"""Every Prometheus metric of the cluster, defined once.

All names start with `llm_cluster_`; label names are shared: `model` (the served
model name), `pool` (prefill | decode | mixed | local ...), `instance` (an engine
instance id within its pool). The API's per-request series are labelled with the instance
that made the token they time (a 1P1D request's TTFT with its prefill instance, its
inter-token gaps with its decode instance); "" for pool and instance where none did (a
request aborted before its first token). Refusals happen before any instance is picked:
they carry `model` and `reason` only. Latencies are histograms in seconds; dashboards take
`histogram_quantile(q, rate(..._bucket[$__rate_interval]))` (examples/grafana/llm-cluster-slo.json,
whose every query tests/runtime/test_up.py runs against a real Prometheus scraping a cluster).
A labelled counter's series exists from an instance's first stats on, at 0, so rate() has data.

| metric                                         | type      | labels                          | set by |
| ---------------------------------------------- | --------- | ------------------------------- | ------ |
| llm_cluster_time_to_first_token_seconds        | histogram | model, pool, instance           | api: request start -> first token (its maker) |
| llm_cluster_inter_token_latency_seconds        | histogram | model, pool, instance           | api: gap between tokens of one completion (the later one's maker) |
| llm_cluster_e2e_request_latency_seconds        | histogram | model, pool, instance           | api: request start -> last token (its maker) |
| llm_cluster_request_queue_time_seconds         | histogram | model, pool, instance           | runtime: submitted to an instance -> first scheduled |
| llm_cluster_prompt_tokens_total                | counter   | model, pool, instance           | api: prompt tokens of finished requests (first token's maker) |
| llm_cluster_generation_tokens_total            | counter   | model, pool, instance           | api: tokens streamed back (each one's maker) |
| llm_cluster_requests_finished_total            | counter   | model, pool, instance, finish_reason | api: one per completion (stop/length/abort/error) |
| llm_cluster_requests_rejected_total            | counter   | model, reason                   | api: invalid, overloaded, unavailable, not_found |
| llm_cluster_prefix_cache_queried_tokens_total  | counter   | model, pool, instance           | runtime: prompt tokens looked up in the prefix cache |
| llm_cluster_prefix_cache_hit_tokens_total      | counter   | model, pool, instance           | runtime: of those, tokens found |
| llm_cluster_preemptions_total                  | counter   | model, pool, instance           | runtime: sequences preempted for KV room |
| llm_cluster_kv_transfer_bytes_total            | counter   | model, pool, instance           | disagg: KV bytes sent by a prefill instance |
| llm_cluster_kv_transfer_latency_seconds        | histogram | model, pool, instance           | disagg: one request's KV hand-over |
| llm_cluster_num_requests_running               | gauge     | model, pool, instance           | runtime: sequences in the running batch |
| llm_cluster_num_requests_waiting               | gauge     | model, pool, instance           | runtime: sequences queued |
| llm_cluster_kv_cache_usage_ratio               | gauge     | model, pool, instance           | runtime: used KV blocks / all blocks (0..1) |
| llm_cluster_pool_size                          | gauge     | model, pool                     | controller: instances in the pool |
| llm_cluster_autoscaler_instances               | gauge     | model, pool, state              | autoscaler: desired / pending / actual / draining instances |
| llm_cluster_autoscaler_decisions_total         | counter   | model, pool, direction, reason  | autoscaler: one per decision (up / down / hold / flip), by its reason |
| llm_cluster_autoscaler_latency_seconds         | gauge     | model, pool, slo, source        | autoscaler: TTFT/ITL at the SLO percentile, predicted by its model or observed |
| llm_cluster_autoscaler_gpus                    | gauge     | model                           | autoscaler: accelerators held by instances (pending ones included) |
| llm_cluster_autoscaler_scale_out_seconds       | histogram | model, pool                     | autoscaler: a scale-up decision -> the new instance serving |
| llm_cluster_slo_target_seconds                 | gauge     | model, slo                      | config: the `slo:` targets (ttft, itl), for dashboards |

Usage:
  1. `Metrics()` makes its own `CollectorRegistry` (several servers or tests in one
     process never collide); pass `registry=` to share one.
  2. The API calls `observe_request` once per engine request (a `RequestRecord`) and `reject` per refusal.
  3. Runtimes call `observe_queue_time` and `set_engine_stats(pool, instance, stats, model=...)`
     with an engine's `stats()` dict; cumulative totals in it (preemptions, prefix-cache
     tokens) become counter increments here.
  4. `render()` is the text `/metrics` serves.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "llm_cluster_"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                     1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)
TRANSFER_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                      1.0, 2.5, 5.0, 10.0)
MODEL_LABELS = ("model",)
INSTANCE_LABELS = ("model", "pool", "instance")
Where = tuple[str, str]  # (pool, instance) of the instance that made a token
NOWHERE: Where = ("", "")


@dataclass
class RequestRecord:
    """One engine request as the API saw it end: its times, and which instance made which tokens."""

    e2e_s: float
    num_prompt_tokens: int
    first: Where = NOWHERE  # made its first token: TTFT and the prompt tokens are counted there
    last: Where = NOWHERE  # made its last: E2E is counted there
    ttft_s: float | None = None
    gaps: list[tuple[float, Where]] = field(default_factory=list)  # inter-token gaps, by the later token's maker
    generated: dict[Where, int] = field(default_factory=dict)  # tokens, by maker
    finish_reasons: list[tuple[str, Where]] = field(default_factory=list)  # one per completion
CONTENT_TYPE = CONTENT_TYPE_LATEST

# engine stats key (a running total) -> counter attribute it advances
_CUMULATIVE_STATS = {
    "num_preemptions": "preemptions",
    "num_prefix_queried_tokens": "prefix_queried_tokens",
    "num_prefix_hit_tokens": "prefix_hit_tokens",
}
# engine stats key (a level) -> gauge attribute
_LEVEL_STATS = {
    "num_running": "num_running",
    "num_waiting": "num_waiting",
    "kv_usage": "kv_usage",
}


class Metrics:
    """The cluster's metrics on one registry; every method is thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, str, str, str], float] = {}  # last cumulative engine stats seen
        r = self.registry

        def hist(name: str, doc: str, labels=MODEL_LABELS, buckets=LATENCY_BUCKETS_S) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels=MODEL_LABELS) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels=INSTANCE_LABELS) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Request start to first token.", INSTANCE_LABELS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of one completion.",
                        INSTANCE_LABELS)
        self.e2e = hist("e2e_request_latency_seconds", "Request start to last token.", INSTANCE_LABELS)
        self.queue_time = hist("request_queue_time_seconds", "Submission to first scheduled step.", INSTANCE_LABELS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of processed requests.", INSTANCE_LABELS)
        self.generation_tokens = counter("generation_tokens", "Generated tokens.", INSTANCE_LABELS)
        self.requests_finished = counter("requests_finished", "Finished completions by finish reason.",
                                         (*INSTANCE_LABELS, "finish_reason"))
        self.requests_rejected = counter("requests_rejected", "Requests refused before generation, by reason.",
                                         ("model", "reason"))
        self.prefix_queried_tokens = counter("prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
                                             INSTANCE_LABELS)
        self.prefix_hit_tokens = counter("prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
                                         INSTANCE_LABELS)
        self.preemptions = counter("preemptions", "Sequences preempted to free KV blocks.", INSTANCE_LABELS)
        self.kv_transfer_bytes = counter("kv_transfer_bytes", "KV cache bytes sent between instances.", INSTANCE_LABELS)
        self.kv_transfer_latency = hist("kv_transfer_latency_seconds", "One request's KV hand-over.", INSTANCE_LABELS,
                                        TRANSFER_BUCKETS_S)
        self.num_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Share of KV blocks in use (0..1).")
        self.pool_size = gauge("pool_size", "Instances in the pool.", ("model", "pool"))
        self.autoscaler_instances = gauge("autoscaler_instances", "Instances per pool: desired, pending, actual, draining.",
                                          ("model", "pool", "state"))
        self.autoscaler_decisions = counter("autoscaler_decisions", "Autoscaler decisions by direction and reason.",
                                            ("model", "pool", "direction", "reason"))
        self.autoscaler_latency = gauge("autoscaler_latency_seconds",
                                        "TTFT/ITL at the SLO percentile: predicted by the autoscaler's model, or observed.",
                                        ("model", "pool", "slo", "source"))
        self.autoscaler_gpus = gauge("autoscaler_gpus", "Accelerators held by instances, pending ones included.", ("model",))
        self.scale_out_time = hist("autoscaler_scale_out_seconds", "A scale-up decision to the new instance serving.",
                                   ("model", "pool"))
        self.slo_target = gauge("slo_target_seconds", "The configured SLO targets.", ("model", "slo"))

    # -- api -------------------------------------------------------------------
    def observe_request(self, model: str, record: RequestRecord) -> None:
        """One engine request ended (all of its completions)."""
        if record.ttft_s is not None:
            self.ttft.labels(model, *record.first).observe(record.ttft_s)
        for gap_s, where in record.gaps:
            self.itl.labels(model, *where).observe(gap_s)
        self.e2e.labels(model, *record.last).observe(record.e2e_s)
        self.prompt_tokens.labels(model, *record.first).inc(record.num_prompt_tokens)
        for where, count in record.generated.items():
            self.generation_tokens.labels(model, *where).inc(count)
        for reason, where in record.finish_reasons:
            self.requests_finished.labels(model, *where, reason).inc()

    def reject(self, model: str, reason: str) -> None:
        """A request was refused (reason: invalid, overloaded, unavailable, not_found, too_long ...)."""
        self.requests_rejected.labels(model, reason).inc()

    # -- runtime ------------------------------------------------------------------
    def observe_queue_time(self, pool: str, instance: str, seconds: float, *, model: str) -> None:
        self.queue_time.labels(model, pool, instance).observe(seconds)

    def set_engine_stats(self, pool: str, instance: str, stats: Mapping[str, float], *, model: str) -> None:
        """An engine's `stats()`: levels set gauges; running totals advance counters by their growth."""
        labels = (model, pool, instance)
        for key, attr in _LEVEL_STATS.items():
            if key in stats:
                getattr(self, attr).labels(*labels).set(stats[key])
        with self._lock:
            for key, attr in _CUMULATIVE_STATS.items():
                if key not in stats:
                    continue
                total = float(stats[key])
                last = self._totals.get((*labels, key), 0.0)
                # a total that went down means the engine restarted: all of it is new
                growth = total - last if total >= last else total
                self._totals[(*labels, key)] = total
                child = getattr(self, attr).labels(*labels)  # the series exists from its first 0 on: rate() works
                if growth > 0:
                    child.inc(growth)

    def remove_instance(self, pool: str, instance: str, *, model: str) -> None:
        """An instance left its pool: drop its series so dashboards stop showing it."""
        labels = (model, pool, instance)
        for attr in (*_LEVEL_STATS.values(), *_CUMULATIVE_STATS.values(), "queue_time", "kv_transfer_bytes",
                     "kv_transfer_latency"):
            try:
                getattr(self, attr).remove(*labels)
            except KeyError:
                pass
        with self._lock:
            for key in _CUMULATIVE_STATS:
                self._totals.pop((*labels, key), None)

    # -- disagg / controller ---------------------------------------------------------
    def observe_kv_transfer(self, pool: str, instance: str, num_bytes: int, seconds: float, *, model: str) -> None:
        self.kv_transfer_bytes.labels(model, pool, instance).inc(num_bytes)
        self.kv_transfer_latency.labels(model, pool, instance).observe(seconds)

    def set_pool_size(self, pool: str, num_instances: int, *, model: str) -> None:
        self.pool_size.labels(model, pool).set(num_instances)

    # -- exposition -------------------------------------------------------------------
    def render(self) -> bytes:
        """Prometheus text format of everything in the registry."""
        return generate_latest(self.registry)
