"""The load generator behind `llm-cluster bench`: vLLM's `bench serve` against any OpenAI-compatible URL.

  load     the workload (lengths, prompts), Poisson or fixed arrivals, streaming clients, rate sweeps
  report   per-request results into throughput, goodput and latency percentiles; table, JSON, plots

The GPU benchmarks of the project itself live beside the package, in `benchmarks/`.
"""
