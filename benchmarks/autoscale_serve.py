"""The autoscaler on one GPU through HTTP: fractional-GPU instances of a smaller model (¼ GPU each),
a burst sent by `llm-cluster bench` (a rate sweep low, high, low), against static provisioning.

For each mode, `llm-cluster up` in a subprocess (local Ray, API on 127.0.0.1), the same sweep, then:
  attainment      requests within both SLO targets, of those sent (the bench's own records)
  instance-s      instances held x seconds over the sweep: autoscaled, from GET /admin/autoscaler
                  polled each second (serving + pending + draining); static, instances x wall time
  autoscale       mixed pool from 1 instance, up to `--max-instances`
  static-max      `--max-instances` all along;   static-min   1 all along

    python -m benchmarks.autoscale_serve --model /tmp/llama1b --make-model --out-dir autoscale_serve
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import threading
import time
import urllib.request

from benchmarks.serve import _bench, _start, _without_requests

ADMIN_KEY = f"sk-bench-admin-{secrets.token_hex(8)}"  # GET /admin/autoscaler answers an admin key only


def _admin_get(url: str, path: str) -> dict:
    request = urllib.request.Request(url.replace("/v1", path), headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.load(r)


def _config(args, mode: str, port: int) -> dict:
    instances = args.max_instances if mode == "static-max" else 1
    on_gpu = args.device == "cuda"
    pool = {"instances": instances, "num_gpus_per_rank": args.gpu_share if on_gpu else 0,
            "num_cpus_per_rank": 2 if on_gpu else 0.25}
    engine = {"model": {"path": args.model, "dtype": "bfloat16" if on_gpu else "float32",
                        "max_model_len": args.max_model_len},
              "cache": {"memory_budget_bytes": int(args.kv_gib * 2**30)} if on_gpu else {"num_blocks": 256},
              "scheduler": {"max_num_seqs": 256, "max_num_batched_tokens": 4096},
              "runner": {"device": args.device}}
    config = {"engine": engine, "prefill": {"instances": 0}, "decode": {"instances": 0}, "mixed": pool,
              "api": {"port": port, "max_pending": 1024, "admin_keys": [ADMIN_KEY]},
              "slo": {"ttft_s": args.slo_ttft_ms / 1e3, "itl_s": args.slo_tpot_ms / 1e3, "percentile": 95}}
    if mode == "autoscale":
        config["autoscale"] = {"enabled": True, "interval_s": 2, "stable_window_s": 20, "min_samples": 2,
                               "mixed": {"min_instances": 1, "max_instances": args.max_instances},
                               "drain_timeout_s": 30}
    return config


def _poll_instances(url: str, stop: threading.Event, samples: list) -> None:
    while not stop.is_set():
        try:
            status = _admin_get(url, "/admin/autoscaler")
            last = status.get("decisions", [{}])[0] if status.get("decisions") else {}
            samples.append({"t": time.monotonic(), "actual": last.get("actual"), "pending": last.get("pending"),
                            "draining": last.get("draining"), "direction": last.get("direction"),
                            "reason": last.get("reason")})
        except OSError:
            pass
        stop.wait(1.0)


def run_mode(args, mode: str, port: int) -> dict:
    class StartArgs:  # what benchmarks.serve's `_start` reads
        start_timeout_s = args.start_timeout_s

    proc = _start(StartArgs, mode, port, args.out_dir, config=_config(args, mode, port))
    url = f"http://127.0.0.1:{port}/v1"
    samples: list = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll_instances, args=(url, stop, samples), daemon=True)
    poller.start()
    t0 = time.monotonic()
    try:
        result = _bench(args, url, args.rates, os.path.join(args.out_dir, f"{mode}_sweep.json"),
                        os.path.join(args.out_dir, f"{mode}_plots"), args.duration_s, seed=7)
    finally:
        wall_s = time.monotonic() - t0
        stop.set()
        poller.join()
        status = _admin_get(url, "/admin/autoscaler")
        _stop(proc)
    if mode == "autoscale":
        held = [(s["actual"] or 0) + (s["pending"] or 0) + (s["draining"] or 0) for s in samples if s["actual"] is not None]
        instance_s = sum(held) * wall_s / max(len(held), 1)
    else:
        instance_s = (args.max_instances if mode == "static-max" else 1) * wall_s
    summaries = [run["summary"] for run in result.get("runs", [])]
    sent = sum(s["num_sent"] for s in summaries)
    good = sum(s["num_good"] for s in summaries)
    return {"mode": mode, "wall_s": wall_s, "instance_s": instance_s, "attainment": good / sent if sent else None,
            "sweep": _without_requests(result), "instances": samples,
            "decisions": status.get("decisions", []), "scale_outs": status.get("scale_outs", [])}


def _stop(proc) -> None:
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--make-model", action="store_true", help="make a ~1B Llama-shaped random checkpoint at --model first")
    ap.add_argument("--modes", default="autoscale,static-max,static-min")
    ap.add_argument("--rates", default="4,24,4")
    ap.add_argument("--duration-s", type=float, default=30)
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--slo-ttft-ms", type=float, default=500)
    ap.add_argument("--slo-tpot-ms", type=float, default=50)
    ap.add_argument("--max-instances", type=int, default=4)
    ap.add_argument("--gpu-share", type=float, default=0.24)
    ap.add_argument("--kv-gib", type=float, default=6.0)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--start-timeout-s", type=float, default=300)
    ap.add_argument("--port", type=int, default=8311)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a plumbing check")
    ap.add_argument("--out-dir", default="autoscale_serve")
    args = ap.parse_args()
    args.rates = args.rates.split(",")
    os.makedirs(args.out_dir, exist_ok=True)
    if args.make_model and not os.path.isdir(args.model):
        from cluster.models.make import make_model

        make_model("llama", args.model, num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8,
                   intermediate_size=8192, vocab_size=32000, max_position_embeddings=8192, dtype="bfloat16",
                   device="cuda", progress=False)
    results = []
    for i, mode in enumerate(args.modes.split(",")):
        results.append(run_mode(args, mode, args.port + i))
        with open(os.path.join(args.out_dir, "autoscale_serve.json"), "w") as f:  # after each mode: a call cut
            json.dump(results, f, indent=1)                                         # short keeps what it ran
        r = results[-1]
        att = "n/a" if r["attainment"] is None else f"{r['attainment']:.1%}"
        print(f"{r['mode']:11s} attainment {att}  instance-seconds {r['instance_s']:.0f}  wall {r['wall_s']:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
