"""The load generator: its metrics math by hand, and `llm-cluster bench` against the real API server.

The server is the project's own: uvicorn on 127.0.0.1 (a free port), `build_app` over a
LocalEngineClient running a tiny random llama on the CPU.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import numpy as np
import pytest

from cluster import cli
from cluster.loadgen.load import (Arrival, LoadConfig, PromptMode, _StreamTimer, arrival_offsets_s, build_workload,
                                rate_configs, request_body)
from cluster.loadgen.report import LatencyStats, RequestResult, summarize, tpot_s

# -- metrics math ---------------------------------------------------------------------------


def test_percentiles_by_hand():
    stats = LatencyStats.of([0.001, 0.002, 0.003, 0.004])
    # linear interpolation over 4 sorted samples: rank p/100 * 3 between neighbours
    assert stats.mean_ms == pytest.approx(2.5) and stats.median_ms == pytest.approx(2.5)
    assert stats.p90_ms == pytest.approx(3.7) and stats.p95_ms == pytest.approx(3.85)
    assert stats.p99_ms == pytest.approx(3.97)
    assert LatencyStats.of([0.010]).p99_ms == pytest.approx(10.0)
    assert LatencyStats.of([]) == LatencyStats()  # nothing measured: every field None


def test_tpot_by_hand():
    assert tpot_s(e2e_s=1.0, ttft_s=0.1, num_output_tokens=10) == pytest.approx(0.1)
    assert tpot_s(e2e_s=0.5, ttft_s=0.5, num_output_tokens=1) is None
    assert RequestResult(ok=True, ttft_s=0.2, e2e_s=0.8, num_output_tokens=4).tpot_s == pytest.approx(0.2)


def _ok(ttft_s: float, tpot: float, num_out: int, itl_s: list[float] = ()) -> RequestResult:
    return RequestResult(ok=True, status=200, num_prompt_tokens=5, num_output_tokens_asked=num_out,
                         num_output_tokens=num_out, ttft_s=ttft_s, e2e_s=ttft_s + tpot * (num_out - 1),
                         itl_s=list(itl_s))


def test_summary_and_goodput_by_hand():
    results = [
        _ok(0.100, 0.080, 10, [0.07, 0.09]),  # TTFT 100 ms, TPOT 80 ms: meets both SLOs
        _ok(0.300, 0.050, 10, [0.05]),  # TTFT 300 ms: misses the TTFT SLO
        _ok(0.150, 0.0, 1),  # one token: no TPOT, so nothing to miss there (vLLM's rule)
        _ok(0.050, 0.120, 3),  # TPOT 120 ms: misses the TPOT SLO
        RequestResult(status=429, error="HTTP 429"),
        RequestResult(status=503, error="HTTP 503"),
        RequestResult(status=500, error="HTTP 500"),
        RequestResult(status=None, error="ClientConnectorError"),
    ]
    s = summarize(results, duration_s=2.0, slo_ttft_ms=200, slo_tpot_ms=100)
    assert (s.num_sent, s.num_completed, s.num_rejected, s.num_failed) == (8, 4, 2, 2)
    assert s.request_throughput == pytest.approx(4 / 2.0)
    assert s.total_output_tokens == 24 and s.output_throughput == pytest.approx(24 / 2.0)
    assert s.total_input_tokens == 20 and s.total_token_throughput == pytest.approx((20 + 24) / 2.0)
    assert s.num_good == 2 and s.goodput == pytest.approx(1.0) and s.goodput_fraction == pytest.approx(2 / 8)
    assert s.ttft.mean_ms == pytest.approx((100 + 300 + 150 + 50) / 4) and s.ttft.median_ms == pytest.approx(125)
    assert s.tpot.mean_ms == pytest.approx((80 + 50 + 120) / 3)  # the 1-token request has no TPOT
    assert s.itl.mean_ms == pytest.approx(70) and s.itl.median_ms == pytest.approx(70)
    assert s.e2e.mean_ms == pytest.approx((820 + 750 + 150 + 290) / 4)
    unbounded = summarize(results, duration_s=2.0)
    assert unbounded.num_good == 4 and unbounded.goodput == unbounded.request_throughput


def test_stream_timer_counts_tokens_per_chunk():
    def feed(events: list[tuple[float, dict | str]]) -> RequestResult:
        result = RequestResult()
        timer = _StreamTimer(result, sent_s=0.5)
        for now_s, event in events:
            timer.on_event(event if isinstance(event, str) else json.dumps(event), now_s)
        timer.finish(1.5)
        return result

    def chunk(text: str, usage: dict | None = None) -> dict:
        return {"choices": [{"index": 0, "text": text, "finish_reason": None}], "usage": usage}

    # no per-chunk usage: one token per content chunk; a chunk with no text is no token
    plain = feed([(1.0, chunk("a")), (1.1, chunk("")), (1.3, chunk("bc")),
                  (1.4, {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}), (1.4, "[DONE]")])
    assert plain.ok and plain.ttft_s == pytest.approx(0.5) and plain.e2e_s == pytest.approx(1.0)
    assert plain.itl_s == pytest.approx([0.3]) and plain.num_output_tokens == 3 and plain.num_prompt_tokens == 7
    assert plain.tpot_s == pytest.approx((1.0 - 0.5) / 2)
    # per-chunk usage (continuous_usage_stats): a chunk whose usage counts a new token is its arrival,
    # text or not (a token whose text is still empty: part of a character, a special token)
    counted = feed([(1.0, chunk("a", {"completion_tokens": 1})), (1.1, chunk("", {"completion_tokens": 2})),
                    (1.3, chunk("bc", {"completion_tokens": 3})), (1.4, "[DONE]")])
    assert counted.itl_s == pytest.approx([0.1, 0.2]) and counted.num_output_tokens == 3
    textless_first = feed([(0.7, chunk("", {"completion_tokens": 1})), (1.0, chunk("a", {"completion_tokens": 2})),
                           (1.4, "[DONE]")])
    assert textless_first.ok and textless_first.ttft_s == pytest.approx(0.2) and textless_first.itl_s == pytest.approx([0.3])
    with pytest.raises(ValueError, match="error event"):
        feed([(1.0, chunk("a")), (1.1, {"error": {"message": "engine step failed"}})])
    with pytest.raises(ValueError, match="DONE"):
        feed([(1.0, chunk("a"))])


def test_poisson_arrivals_have_mean_gap_one_over_rate():
    offsets = arrival_offsets_s(20000, 5.0, Arrival.POISSON, seed=3)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: std == mean
    assert np.array_equal(offsets, arrival_offsets_s(20000, 5.0, Arrival.POISSON, seed=3))
    assert not np.array_equal(offsets, arrival_offsets_s(20000, 5.0, Arrival.POISSON, seed=4))
    assert np.allclose(np.diff(arrival_offsets_s(5, 4.0, Arrival.FIXED, seed=0)), 0.25)
    assert np.all(arrival_offsets_s(5, math.inf, Arrival.POISSON, seed=0) == 0)


def test_workload_lengths_and_seeding():
    config = LoadConfig(num_requests=200, input_len=40, output_len=10, range_ratio=0.5, seed=1, max_token_id=500)
    specs = build_workload(config)
    assert all(20 <= len(s.prompt) == s.num_prompt_tokens <= 60 and 5 <= s.num_output_tokens <= 15 for s in specs)
    assert all(100 <= t < 500 for s in specs for t in s.prompt)
    assert len({s.num_prompt_tokens for s in specs}) > 10
    assert specs == build_workload(config) and specs != build_workload(LoadConfig(**{**config.__dict__, "seed": 2}))
    exact = build_workload(LoadConfig(num_requests=3, input_len=8, output_len=4, prompt_mode=PromptMode.TEXT))
    assert all(len(s.prompt.split()) == 8 and s.num_output_tokens == 4 for s in exact)
    body = request_body(config, "m", specs[0])
    assert body["ignore_eos"] is True and body["stream"]
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert body["prompt"] == specs[0].prompt and body["max_tokens"] == specs[0].num_output_tokens
    plain = request_body(LoadConfig(continuous_usage=False), "m", specs[0])
    assert plain["stream_options"] == {"include_usage": True}


def test_each_rate_of_a_sweep_sends_prompts_of_its_own():
    """A sweep's runs must not resend the prompts of the runs before: the server's prefix cache would
    hold their KV and the later rates would prefill nothing."""
    config = LoadConfig(num_requests=50, input_len=64, output_len=4, seed=7)
    configs = rate_configs(config, [2.0, 8.0, 32.0])
    assert [c.request_rate for c in configs] == [2.0, 8.0, 32.0] and [c.seed for c in configs] == [7, 8, 9]
    prompts = [{tuple(s.prompt) for s in build_workload(c)} for c in configs]
    assert not (prompts[0] & prompts[1]) and not (prompts[1] & prompts[2]) and not (prompts[0] & prompts[2])
    assert configs[0] == LoadConfig(**{**config.__dict__, "request_rate": 2.0})  # the first is the config's own


@pytest.mark.parametrize("field, value", [("num_requests", 0), ("request_rate", 0.0), ("duration_s", math.inf),
                                          ("range_ratio", 1.0), ("max_concurrency", 0), ("slo_ttft_ms", -1.0),
                                          ("url", "127.0.0.1:8000"), ("max_token_id", 50)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"LoadConfig.{field}="):
        LoadConfig(**{field: value})


# -- against the real server ----------------------------------------------------------------------


class Server:
    """The project's API server in a daemon thread on 127.0.0.1, a free port."""

    def __init__(self, path: str, max_pending: int):
        from cluster.api.server import build_app, make_server
        from cluster.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig
        from cluster.metrics import Metrics
        from cluster.runtime.local import LocalClientConfig, LocalEngineClient

        metrics = Metrics()
        config = EngineConfig(model=ModelConfig(path=path, max_model_len=512), cache=CacheConfig(num_blocks=1024),
                              runner=RunnerConfig(device="cpu"))
        self.client = LocalEngineClient.from_config(config, LocalClientConfig(max_pending=max_pending), metrics,
                                                    served_name="tiny-llama")
        self.server = make_server(build_app(self.client, metrics, "tiny-llama"), "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        asyncio.run(self.client.close())


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    s = Server(checkpoint_dir("llama"), max_pending=128)
    yield s
    s.close()


def _bench(url: str, tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "results.json"
    rc = cli.main(["bench", "--url", url, "--out", str(out), "--plot-dir", str(tmp_path / "plots"),
                   "--duration-s", "60", "--request-timeout-s", "60", *extra])
    return rc, json.loads(out.read_text())


def _check_exact(run: dict) -> None:
    for r in run["requests"]:
        assert r["ok"] and r["status"] == 200, r
        assert r["num_output_tokens"] == r["num_output_tokens_asked"], r
        assert r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"] and len(r["itl_s"]) <= r["num_output_tokens"] - 1


def test_bench_against_the_real_server(server, tmp_path, capsys):
    args = ["--num-requests", "20", "--request-rate", "20", "--max-concurrency", "8", "--input-len", "32",
            "--output-len", "12", "--range-ratio", "0.5", "--seed", "7", "--slo-ttft-ms", "2000",
            "--slo-tpot-ms", "500"]
    rc, result = _bench(server.url, tmp_path, *args)
    table = capsys.readouterr().out
    print(table)
    assert rc == 0 and "Goodput (req/s)" in table and "P99 ITL (ms)" in table
    assert result["model"] == "tiny-llama" and result["args"]["request_rate"] == 20.0
    assert result["args"]["slo_tpot_ms"] == 500.0 and result["args"]["sweep_rates"] is None
    (run,) = result["runs"]
    s = run["summary"]
    assert (s["num_sent"], s["num_completed"], s["num_rejected"], s["num_failed"]) == (20, 20, 0, 0)
    _check_exact(run)
    specs = build_workload(LoadConfig(num_requests=20, input_len=32, output_len=12, range_ratio=0.5, seed=7))
    assert [r["num_prompt_tokens"] for r in run["requests"]] == [len(s.prompt) for s in specs]  # exact lengths
    assert sorted(r["num_output_tokens"] for r in run["requests"]) == sorted(s.num_output_tokens for s in specs)
    assert s["total_output_tokens"] == sum(sp.num_output_tokens for sp in specs)
    assert 0 < s["goodput"] <= s["request_throughput"] and s["num_good"] <= 20
    assert s["ttft"]["p99_ms"] >= s["ttft"]["median_ms"] > 0 and s["tpot"]["mean_ms"] > 0
    assert (tmp_path / "plots" / "latency_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = sorted([(r["start_s"], 1) for r in run["requests"]] + [(r["start_s"] + r["e2e_s"], -1)
                                                                     for r in run["requests"]])
    assert max(np.cumsum([step for _, step in events])) <= 8  # --max-concurrency


def test_duration_bounds_the_run(server, tmp_path):
    rc, result = _bench(server.url, tmp_path, "--num-requests", "50", "--request-rate", "10", "--arrival", "fixed",
                        "--duration-s", "0.55", "--input-len", "8", "--output-len", "4")
    s = result["runs"][0]["summary"]
    assert rc == 0 and s["num_sent"] == s["num_completed"] == 6  # sent at 0, 0.1, ..., 0.5 s
    assert s["duration_s"] < 5


def test_sweep_with_text_chat_prompts(server, tmp_path):
    rc, result = _bench(server.url, tmp_path, "--sweep-rates", "inf,10", "--num-requests", "6", "--endpoint", "chat",
                        "--prompt-mode", "text", "--input-len", "12", "--output-len", "8", "--arrival", "fixed",
                        "--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000")
    assert rc == 0 and [run["request_rate"] for run in result["runs"]] == ["inf", 10.0]
    for run in result["runs"]:
        assert run["summary"]["num_completed"] == 6
        _check_exact(run)
    points = result["goodput_vs_rate"]
    assert [p["request_rate"] for p in points] == ["inf", 10.0]
    assert all(0 <= p["goodput"] <= p["request_throughput"] for p in points)
    for name in ("latency_cdf.png", "goodput_vs_rate.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_overload_counts_rejections_apart(checkpoint_dir, tmp_path):
    small = Server(checkpoint_dir("llama"), max_pending=2)
    try:
        rc, result = _bench(small.url, tmp_path, "--num-requests", "12", "--request-rate", "inf",
                            "--input-len", "16", "--output-len", "24")
    finally:
        small.close()
    s = result["runs"][0]["summary"]
    assert rc == 0 and s["num_failed"] == 0 and s["num_rejected"] >= 1 and s["num_completed"] >= 1
    assert s["num_rejected"] + s["num_completed"] == 12 and s["goodput_fraction"] < 1
    assert all(r["status"] == 429 for r in result["runs"][0]["requests"] if not r["ok"])


def test_unreachable_url_is_a_clear_error(capsys):
    assert cli.main(["bench", "--url", "http://127.0.0.1:1/v1", "--num-requests", "1"]) == 2
    assert "cannot reach" in capsys.readouterr().err
