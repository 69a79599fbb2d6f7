"""The session summary reads a GPU session's files and prints each target's figure: checked on the
2026-11-30 2xH200 session's recorded results (benchmarks/results/), whose figures docs/benchmark-history.md
quotes."""
from __future__ import annotations

import os
import shutil

from benchmarks.session_summary import load, render

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")


def test_the_recorded_session_gives_the_documented_figures(tmp_path):
    work = tmp_path / "work"
    (work / "serve").mkdir(parents=True)
    for src, dst in (("parallel_bench_2xh200_run5.jsonl", "parallel.jsonl"), ("pp_bench_2xh200_run3.jsonl", "pp.jsonl"),
                     ("moe_bench_2xh200_run2.jsonl", "moe.jsonl"), ("disagg_bench_2xh200_run4.json", "disagg.json"),
                     ("serve_bench_2xh200_run3.json", "serve/serve_summary.json")):
        shutil.copy(os.path.join(RESULTS, src), work / dst)
    text = render(load([str(work)]))
    assert "| 64 | 7.16 | 5.11 | 0.71 | 0.77 |" in text  # TP=2 / TP=1 at batch 64, async and sync
    assert "21064 tokens/s = 0.83 x TP=2" in text
    assert "batch 256: EP=2 10949, TP=2 54212" in text
    assert "transfer_stacked (5 messages): 115 GB/s = 32% of raw 360 GB/s" in text
    assert "(+0.9%)" in text and "1P1D 61.7 ms, colocated 65.4 ms (-5.8%)" in text
    assert "32.0 req/s: 1p1d: 23.27 (100%, 204)" in text


def test_a_missing_run_says_not_run(tmp_path):
    text = render(load([str(tmp_path)]))
    assert text.count("not run") >= 6 and "0.0" not in text


def test_the_hardware_limits_come_first(tmp_path):
    """gpu_session.sh measures HBM bandwidth and bf16 matmul in every call (benchmarks.hardware.measure)."""
    import json

    (tmp_path / "hardware.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "hbm_gb_s": 4275.7, "bf16_tflops": 794.2, "spec": {"hbm_gb_s": 4800, "bf16_tflops": 989}}))
    text = render(load([str(tmp_path)]))
    assert text.startswith("## Hardware limits") and "NVIDIA H200: HBM 4276 GB/s, bf16 matmul 794 TFLOP/s" in text


def test_this_sessions_serving_and_transfer_figures(tmp_path):
    """The sixth session's files (benchmarks/results/): the transfer's host split, the gathers compared, and
    the worst each instance saw during the admission sweep (the figures docs/benchmark-history.md quotes)."""
    work = tmp_path / "work"
    (work / "serve-admit").mkdir(parents=True)
    shutil.copy(os.path.join(RESULTS, "disagg_bench_2xh200_run8.json"), work / "disagg.json")
    shutil.copy(os.path.join(RESULTS, "serve_admit_2xh200_run2.json"), work / "serve-admit" / "serve_summary.json")
    text = render(load([str(work)]))
    assert "index_select 698 us, index_select_16_byte_words 350 us" in text
    assert "transfer_pregathered (5 messages): 234 GB/s = 65% of raw 359 GB/s" in text
    assert "48.0 req/s: 1p1d: 0.67 (2%, 790); colocated: 14.61 (35%, 218)" in text
    assert "prefill-0 step 221 ms, gap 2 ms, est. wait 0.34 s, held 225" in text
