"""Per pool: what the autoscaler wants and gets, and how each pool's queues, KV and transfers look.

Rows: the autoscaler (instances desired / pending / actual / draining, decisions by reason, predicted
vs observed TTFT and ITL, scale-out time, accelerators held); queues and KV use; the KV hand-over from
prefill to decode; latency per instance. A `pool` variable narrows every panel.
"""
from __future__ import annotations

from dashboards.grafana import M, RATE, Panel, Query, dashboard, link, query_variable
from dashboards.rules import NS

MP = f'{M}, pool=~"$pool"'


def _latency(slo: str, title: str) -> Panel:
    return Panel(f"{title}: predicted vs observed (autoscaler)", [
        Query(f'llm_cluster_autoscaler_latency_seconds{{{MP}, slo="{slo}"}}', "{{pool}} {{source}}"),
        Query(f'{NS}slo_target:seconds{{slo="{slo}"}}', "target")], unit="s",
        description=f"{title} at the SLO percentile: the autoscaler's model of the pool, and what it measured.")


def _per_instance(metric: str, q: float) -> Query:
    return Query(f"histogram_quantile({q}, sum by (pool, instance, le) (rate({metric}_bucket{{{MP}}}[{RATE}])))",
                 f"p{round(q * 100)} {{{{pool}}}} {{{{instance}}}}")


def build() -> dict:
    autoscaler = [
        Panel("Instances: desired, pending, actual, draining", [
            Query(f"sum by (pool, state) (llm_cluster_autoscaler_instances{{{MP}}})", "{{pool}} {{state}}"),
            Query(f"sum by (pool) (llm_cluster_pool_size{{{MP}}})", "{{pool}} serving")]),
        Panel("Autoscaler decisions by direction and reason", [Query(
            f"sum by (pool, direction, reason) (increase(llm_cluster_autoscaler_decisions_total{{{MP}}}[{RATE}]))",
            "{{pool}} {{direction}}: {{reason}}")]),
        _latency("ttft", "TTFT"),
        _latency("itl", "ITL"),
        Panel("Scale-out time: decision to serving (1 h)", [
            Query(f"histogram_quantile({q}, sum by (pool, le) (rate(llm_cluster_autoscaler_scale_out_seconds_bucket"
                  f"{{{MP}}}[1h])))", f"p{round(q * 100)} {{{{pool}}}}") for q in (0.5, 0.99)], unit="s",
              description="Scale-ups are rare: quantiles over the last hour, not the rate interval."),
        Panel("Accelerators held (pending included)", [Query(f"llm_cluster_autoscaler_gpus{{{M}}}", "{{model}}")]),
    ]
    queues = [
        Panel("Waiting and running sequences per pool", [
            Query(f"sum by (pool) (llm_cluster_num_requests_waiting{{{MP}}})", "{{pool}} waiting"),
            Query(f"sum by (pool) (llm_cluster_num_requests_running{{{MP}}})", "{{pool}} running")]),
        Panel("KV cache usage per instance", [Query(f"llm_cluster_kv_cache_usage_ratio{{{MP}}}",
                                                    "{{pool}} {{instance}}")], unit="percentunit", max_value=1),
        Panel("Prefix cache hit rate per instance", [Query(
            f"sum by (pool, instance) (rate(llm_cluster_prefix_cache_hit_tokens_total{{{MP}}}[{RATE}]))"
            f" / sum by (pool, instance) (rate(llm_cluster_prefix_cache_queried_tokens_total{{{MP}}}[{RATE}]))",
            "{{pool}} {{instance}}")], unit="percentunit", max_value=1),
        Panel("Preemptions per instance", [Query(
            f"sum by (pool, instance) (rate(llm_cluster_preemptions_total{{{MP}}}[{RATE}]))", "{{pool}} {{instance}}")]),
    ]
    transfer = [
        Panel("KV transfer: bytes/s sent by prefill instances", [Query(
            f"sum by (instance) (rate(llm_cluster_kv_transfer_bytes_total{{{MP}}}[{RATE}]))", "{{instance}}")],
            unit="Bps"),
        Panel("KV hand-over latency", [Query(
            f"histogram_quantile({q}, sum by (le) (rate(llm_cluster_kv_transfer_latency_seconds_bucket{{{MP}}}[{RATE}])))",
            f"p{round(q * 100)}") for q in (0.5, 0.99)], unit="s"),
    ]
    per_instance = [
        Panel("TTFT p99 per instance (the first token's maker: prefill in 1P1D)",
              [_per_instance("llm_cluster_time_to_first_token_seconds", 0.99)], unit="s"),
        Panel("ITL p99 per instance (decode in 1P1D)", [_per_instance("llm_cluster_inter_token_latency_seconds", 0.99)],
              unit="s"),
    ]
    pool = query_variable("pool", "pool", 'label_values(llm_cluster_pool_size{model=~"$model"}, pool)')
    return dashboard("llm-cluster-pools", "llm-cluster: pools and autoscaler",
                     "Per pool: the autoscaler's desired/pending/actual instances and decisions, queues, KV use "
                     "and the KV hand-over.",
                     [("Autoscaler", autoscaler), ("Queues and KV cache", queues),
                      ("KV hand-over (prefill -> decode)", transfer), ("Latency per instance", per_instance)],
                     variables=(pool,), links=(link("SLOs", "llm-cluster-slo"),))
