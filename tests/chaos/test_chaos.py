"""The chaos run (benchmarks/chaos.py) at a small size: the tiny checkpoint, 2 prefill + 2 decode on a
Ray head and one decode on a second raylet (127.0.0.1), a real redis-server, 4 `openai` streaming
clients. Through a decode killed mid-stream, a prefill killed mid-transfer, Redis restarted, the worker
node killed and a 10x burst: no client hung, none lost a request, Redis's registry and prefix index
came back, the burst got clear 429s, and the cluster was back to full size after each fault."""
from __future__ import annotations

import json

import pytest

from benchmarks.chaos import build_parser, run

pytestmark = pytest.mark.slow


def test_chaos_run_loses_nothing_and_recovers(checkpoint_dir, tmp_path):
    out = tmp_path / "chaos.json"
    args = build_parser().parse_args([
        "--model", checkpoint_dir("llama"), "--clients", "4", "--max-tokens", "32", "--warmup-s", "2",
        "--settle-s", "1", "--redis-outage-s", "2", "--request-timeout-s", "30", "--max-requests-per-client", "300",
        "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    report = run(args)
    assert json.loads(out.read_text())["phases"], "the report was not written"
    phases = {p["fault"]: p for p in report["phases"]}
    assert list(phases) == ["decode_killed_mid_stream", "prefill_killed_mid_transfer", "redis_restarted",
                            "worker_node_killed", "overload_burst"]
    assert report["lost"] == 0, json.dumps(report["phases"], indent=1)  # no request ends short or wrong, silently
    for name, phase in phases.items():
        assert "skipped" not in phase and phase["capacity_restored"], (name, phase)
        assert phase["lost"] == 0, (name, phase)
    assert phases["decode_killed_mid_stream"]["in_flight_at_fault"] >= 1
    redis = phases["redis_restarted"]
    assert redis["clear_errors"] == 0, redis
    assert redis["redis_reregistered"] and redis["prefix_index_rebuilt"], redis
    assert phases["worker_node_killed"]["victims"], "no instance lived on the worker node"
    burst = phases["overload_burst"]["burst"]
    assert burst["hung"] == 0 and burst["lost"] == 0
    assert burst["completed"] + burst["clear_errors"] == burst["requests"] and burst["clear_errors"] >= 1, burst
    assert set(burst["clear_error_statuses"]) <= {"429", "503"}, burst
    # no client waited 30 s for a byte: every request in flight through each fault completed or ended with
    # a clear error (docs/architecture.md, "When parts fail")
    assert report["hung"] == 0, ", ".join(f"{n} {p['hung']}: {p['examples']['hung']}" for n, p in phases.items()
                                          if p["hung"])
    assert redis["completed"] == redis["requests"], redis  # every request through the outage completed
