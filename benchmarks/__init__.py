"""GPU benchmarks, probes and session scripts of llm-cluster: beside the product, not inside it.

Run from the repository root, e.g. `python -m benchmarks.engine --model DIR --out engine.json`;
docs/benchmarks.md lists today's figures and the command behind each. These modules use the
package's public surface (configs, `Engine`, the disaggregation workers and transports) and
measure from outside: wall clocks around public calls, CUDA events and profilers of their own.

  engine, prefill_budget, host       one engine on one GPU (or CPU): decode, prefill, offline, host work
  parallel, allreduce, harness       TP / PP / EP instances on one host; `profile` splits a step's time
  disagg, sender_host, sender_probes KV transfer between two engines, and the sender's host time
  serve                              `llm-cluster up` + `llm-cluster bench` (cluster.loadgen) through HTTP
  attention, gemm, fused_norm        kernels alone; `hardware`: HBM bandwidth and matmul peak
  gpu_session.sh, session_summary    one GPU call's items and the markdown summary of what it measured
  results/                           raw result files of past sessions (docs/benchmark-history.md)
"""
