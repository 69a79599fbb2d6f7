"""Grafana dashboards and Prometheus rules for llm-cluster, generated from this package (one code path).

  slo.py           the `slo:` block as PromQL text (or `${slots}` the Helm chart fills); SLIs, windows, burns
  rules.py         recording rules (constants, error ratios per window, 30-day ratio, goodput) and the
                   multi-window multi-burn-rate alerts
  grafana.py       a small panel / dashboard builder (datasource and model variables, grid layout)
  slo_overview.py  the SLO dashboard: budget, burn rates, attainment, goodput, latency, traffic
  pools.py         the pools dashboard: autoscaler, queues, KV use, KV hand-over, per-instance latency

`python -m dashboards` writes what is committed beside it (grafana/*.json, rules/*.yaml); `--check`
fails if they differ from what the code makes (tests/dashboards runs it), and `--config cluster.yaml
--out DIR` writes the rules for a deployment's own `slo:` block. The Helm chart packs this folder
(helm/llm-cluster/dashboards is a link to it): the dashboards verbatim, the rules from
`rules/llm-cluster-slo.rules.in.yaml` with the chart's `slo:` values in its slots.
A new metric's panel is a `Panel(title, [Query(expr, legend)])` in the dashboard module it belongs to.
"""
