"""The GPU benchmarks still run: each in its CPU mode (gloo, tiny random checkpoints), end to end.

Device time is scarce (30 minutes a session), and a benchmark that broke between sessions wastes it.
`benchmarks/host.py` broke once, silently, when the engine's defaults changed. These runs measure
nothing. They check that every part of every benchmark runs and writes the records the docs read,
with no part reporting an error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# `benchmarks` is not installed with the package: the runs below (from a scratch folder) find it here
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], cwd, timeout_s: float = 400) -> str:
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_bench_parallel_profiles_the_pipeline(tmp_path):
    out = tmp_path / "pp.jsonl"
    _run(["benchmarks.parallel", "--smoke", "--parts", "pp", "--profile", "--llama-dir", str(tmp_path / "llama"),
          "--pp-batch", "8", "--context", "16", "--steps", "2", "--max-model-len", "256", "--out", str(out)], tmp_path)
    records = _records(out)
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]
    profile = [r for r in records if r["part"] == "profile"]
    assert profile and profile[0]["pp"] == 2 and profile[0]["host_ms_per_step"]["finish"] > 0
    # one engine per partition: the 4-layer smoke model balanced against its LM head, and even
    assert {r["partition"]: r["layers_per_stage"] for r in records if "layers_per_stage" in r} == {
        "balanced": [1, 3], "even": [2, 2]}


def test_bench_parallel_runs_every_part(tmp_path):
    out = tmp_path / "par.jsonl"
    _run(["benchmarks.parallel", "--smoke", "--parts", "dense,shard,moe,pp", "--llama-dir", str(tmp_path / "llama"),
          "--moe-dir", str(tmp_path / "moe"), "--batches", "1,4", "--moe-batches", "4", "--pp-batch", "8",
          "--context", "16", "--steps", "2", "--prefill-len", "32", "--max-model-len", "256",
          "--tp2-normal-priority", "--tp2-nccl-ctas", "8", "--tp2-fused-norm", "--out", str(out)], tmp_path)
    records = _records(out)
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]
    variants = {(r["part"], r.get("layout", r.get("tp")), r["variant"]) for r in records if "variant" in r}
    for wanted in [("dense", 1, "single"), ("dense", 1, "single_sync"), ("dense", 2, "overlap_off"),
                   ("dense", 2, "overlap_off_sync"), ("dense", 2, "overlap_on"), ("moe", "ep2", "overlap_on"),
                   ("moe", "tp2", "overlap_off"), ("moe", "tp2", "overlap_off_eager")]:
        assert wanted in variants, wanted
    pp = {r["variant"]: r for r in records if r["part"] == "pp" and "variant" in r}
    assert {"two_batches_m1", "three_batches_m1", "one_batch_m2"} <= set(pp) and all(r["tokens_per_s"] > 0 for r in pp.values())
    ratios = {(r["phase"], r["batch"]) for r in records if r["part"] == "shard" and "tp2_rank_over_full" in r}
    assert ratios == {("decode_ratio", 1), ("decode_ratio", 4), ("prefill_ratio", None)}, ratios
    assert {r["allreduce"] for r in records if r.get("phase") == "decode" and r["part"] == "dense"} == {"none", "engine", "engine_normal_priority", "engine_ctas8",
                                                                                                       "engine_fused_norm"}


def test_bench_host_and_disagg_run(tmp_path):
    line = _run(["benchmarks.host", "--model", str(tmp_path / "tiny"), "--batch", "8", "--context", "64",
                 "--steps", "3"], tmp_path).strip().splitlines()[-1]
    assert set(json.loads(line)["us_median"]) == {"schedule", "plan", "pack", "upload", "update_emit"}
    from cluster.models.make import make_model

    model = make_model("llama", str(tmp_path / "llama"), num_layers=2, progress=False)
    out = tmp_path / "disagg.json"
    _run(["benchmarks.disagg", "--model", model, "--device", "cpu", "--prompt-len", "64", "--repeats", "2",
          "--out", str(out)], tmp_path)
    with open(out) as f:
        result = json.load(f)
    for name in ("transfer_only", "transfer_stacked", "transfer_announced", "transfer_pregathered"):
        assert result[name]["gb_s"] > 0 and len(result[name]["runs"]) == 2, name  # the warm-up round not kept
    assert result["transfer_stacked"]["messages"] < result["transfer_only"]["messages"]
    run = result["transfer_stacked"]["runs"][0]  # the sender's host time, and how much of it was on the CPU
    assert len(run["read_cpu_us"]) == len(run["read_us"]) == result["transfer_stacked"]["messages"] - 1
    assert all(0 <= cpu <= wall * 1.05 + 50 for cpu, wall in zip(run["read_cpu_us"], run["read_us"]))
    assert run["others_cpu_us"] > -2000  # (two clocks, of coarse resolution: a small negative is rounding)
    # the sender's sends counted done, the decode side's last message landed, then scattered (the announce starts the clock)
    assert run["sent_ms"] > 0 and 0 < run["landed_ms"] <= run["joined_ms"]
    from benchmarks.session_summary import _host_split

    assert "on the CPU: gathers" in _host_split(result["transfer_stacked"])
    assert result["ttft_1p1d_ms_median"] > 0 and result["ttft_colocated_ms_median"] > 0


def test_bench_serve_runs_both_deployments(tmp_path):
    """`llm-cluster up` in a subprocess per deployment (local Ray, API on 127.0.0.1), a sweep of one
    low rate through the HTTP client, the cluster stopped: every request completes in both."""
    from cluster.models.make import make_model

    model = make_model("llama", str(tmp_path / "llama"), num_layers=2, progress=False)
    out = tmp_path / "serve"
    _run(["benchmarks.serve", "--model", model, "--device", "cpu", "--rates", "2", "--num-requests", "6",
          "--duration-s", "3", "--low-duration-s", "3", "--input-len", "32", "--output-len", "8",
          "--max-model-len", "256", "--out-dir", str(out)], tmp_path)
    with open(out / "serve_summary.json") as f:
        summary = json.load(f)
    assert set(summary) == {"1p1d", "colocated"}
    for deployment in summary.values():
        runs = deployment["sweep"]["runs"] + deployment["low_rate"]["runs"]
        assert runs
        assert all(r["summary"]["num_completed"] == 6 and r["summary"]["num_failed"] == 0 for r in runs)
