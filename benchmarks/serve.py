"""Serving benchmark: 1P1D vs colocated replicas on the same GPUs, through the real HTTP stack.

    python -m benchmarks.serve --model DIR --rates 1,2,4 --out-dir serve_results

For each deployment (`1p1d`: one prefill + one decode instance, one GPU each;
`colocated`: two mixed instances, one GPU each; `colocated-1`: one mixed instance, one GPU):
  (1) `llm-cluster up --config <generated yaml>` in a subprocess, waited on until ready;
  (2) `llm-cluster bench` sweeps the request rates (Poisson arrivals, prefill-heavy:
      `--input-len` in / `--output-len` out) and reports goodput under the TTFT/TPOT SLOs;
  (3) while the lowest rate runs, /health is polled for each instance's mean engine step
      time, to put the decode engine's step time beside the ITL the HTTP client saw;
  (4) the cluster is stopped with SIGINT.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from cluster.runtime.instance import STALL_KEYS

DEPLOYMENTS = {
    "1p1d": {"prefill": {"instances": 1, "num_gpus_per_rank": 1, "num_cpus_per_rank": 2},
             "decode": {"instances": 1, "num_gpus_per_rank": 1, "num_cpus_per_rank": 2}},
    "colocated": {"prefill": {"instances": 0}, "decode": {"instances": 0},
                  "mixed": {"instances": 2, "num_gpus_per_rank": 1, "num_cpus_per_rank": 2}},
    # one mixed instance on one GPU: what a colocated replica holds alone (on a one-GPU machine)
    "colocated-1": {"prefill": {"instances": 0}, "decode": {"instances": 0},
                    "mixed": {"instances": 1, "num_gpus_per_rank": 1, "num_cpus_per_rank": 2}},
}


def _config(args, name: str, port: int) -> dict:
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    engine = {"model": {"path": args.model, "dtype": dtype, "max_model_len": args.max_model_len},
              "cache": {"gpu_memory_fraction": 0.85},
              "scheduler": {"max_num_seqs": 256, "max_num_batched_tokens": args.max_num_batched_tokens}}
    pools = json.loads(json.dumps(DEPLOYMENTS[name]))
    if args.prefill_max_num_batched_tokens and "prefill" in pools and pools["prefill"].get("instances"):
        pools["prefill"]["max_num_batched_tokens"] = args.prefill_max_num_batched_tokens
    if args.device == "cpu":  # plumbing check on a machine without GPUs
        engine["runner"] = {"device": "cpu"}
        for pool in pools.values():
            pool.update(num_gpus_per_rank=0, num_cpus_per_rank=0.5) if pool.get("instances") else None
    api = {"port": port, "max_pending": 1024}
    if args.max_queue_wait_s:
        api["max_queue_wait_s"] = args.max_queue_wait_s
    if args.max_decode_step_ms:
        api["max_decode_step_ms"] = args.max_decode_step_ms
    return {"engine": engine, **pools, "api": api}


def _start(args, name: str, port: int, out_dir: str, config: dict | None = None) -> subprocess.Popen:
    """`llm-cluster up` with `config` (None: the deployment `name`'s), waited on until it serves."""
    path = os.path.join(out_dir, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(config if config is not None else _config(args, name, port), f)
    log = open(os.path.join(out_dir, f"{name}.server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--config", path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        log.write(line)
        if "OpenAI API:" in line:
            threading.Thread(target=lambda: [log.write(l) for l in proc.stdout], daemon=True).start()
            return proc
        if proc.poll() is not None:
            break
    log.flush()
    raise RuntimeError(f"{name}: the cluster did not start (see {log.name})")


# what admission saw of each instance each second (its estimate against what the instance reported)
ADMISSION_KEYS = ("num_waiting", "num_queued_prefill_tokens", "prefill_tokens_per_s", "prefill_rate", "estimated_wait_s",
                  "num_held_transfers")


def _poll_step_times(url: str, stop: threading.Event, samples: list, stalls: list) -> None:
    """Each second: every instance's mean decode step time (`samples`), and its worst step, wait between steps,
    command time and KV landing since the last heartbeat (`stalls`: where a stream's pauses come from)."""
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url.replace("/v1", "/health"), timeout=5) as r:
                health = json.load(r)
            instances = health.get("instances", {})
            # decode-only steps where the instance reports them (a colocated one also runs prefill steps,
            # which its streams' inter-token latency does not see as a step of its own)
            samples.append({k: v.get("mean_decode_step_ms") or v["mean_step_ms"] for k, v in instances.items()
                            if v.get("mean_decode_step_ms") or v.get("mean_step_ms")})
            stalls.append({"t": time.time(), **{k: {m: v.get(m) for m in (*STALL_KEYS, *ADMISSION_KEYS, "num_running")}
                                                for k, v in instances.items()}})
        except OSError:
            pass
        stop.wait(1.0)


@contextlib.contextmanager
def _polling_health(url: str, samples: list, stalls: list):
    """`_poll_step_times` in a thread for as long as the block runs."""
    stop = threading.Event()
    poller = threading.Thread(target=_poll_step_times, args=(url, stop, samples, stalls), daemon=True)
    poller.start()
    try:
        yield
    finally:
        stop.set()
        poller.join()


def _bench(args, url: str, rates: list[str], out: str, plot_dir: str, duration_s: float, seed: int) -> dict:
    """`llm-cluster bench` at `rates`; each rate's prompts are seeded `seed` + its index, so the low-rate
    run (seed 1) and the sweep (seed 101) never send a prompt the server has cached."""
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "--url", url, "--sweep-rates", ",".join(rates),
           "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--slo-ttft-ms", str(args.slo_ttft_ms),
           "--slo-tpot-ms", str(args.slo_tpot_ms), "--duration-s", str(duration_s), "--seed", str(seed),
           "--out", out, "--plot-dir", plot_dir]
    subprocess.run(cmd, check=True, timeout=(duration_s + 60) * len(rates) + 120)  # each rate drains after its arrivals
    with open(out) as f:
        return json.load(f)


def _without_requests(result: dict) -> dict:
    return {**result, "runs": [{k: v for k, v in run.items() if k != "requests"} for run in result.get("runs", [])]}


def run_deployment(args, name: str, port: int) -> dict:
    proc = _start(args, name, port, args.out_dir)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        samples, stalls_low, stalls_sweep = [], [], []
        with _polling_health(url, samples, stalls_low):
            low = _bench(args, url, [args.rates[0]], os.path.join(args.out_dir, f"{name}_low.json"),
                         os.path.join(args.out_dir, f"{name}_low_plots"), args.low_duration_s or args.duration_s, seed=1)
        with _polling_health(url, [], stalls_sweep):
            sweep = _bench(args, url, args.rates, os.path.join(args.out_dir, f"{name}_sweep.json"),
                           os.path.join(args.out_dir, f"{name}_plots"), args.duration_s, seed=101)
        # the per-request lists stay in the {name}_*.json files: with them this summary reached 32 MB,
        # over what a GPU call can bring back (16 MiB a file)
        return {"low_rate": _without_requests(low), "sweep": _without_requests(sweep), "step_ms_samples": samples,
                "stalls": {"low_rate": stalls_low, "sweep": stalls_sweep}}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def worst(stalls: list[dict]) -> dict:
    """Per instance, the worst of each stall figure over a run's heartbeat samples."""
    out: dict = {}
    for sample in stalls:
        for instance, figures in sample.items():
            if instance == "t":
                continue
            for key, value in figures.items():
                if value is not None:
                    out.setdefault(instance, {})[key] = max(out.get(instance, {}).get(key, value), value)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--make-llama8b", action="store_true", help="make a Llama-3-8B-shaped random checkpoint at --model first")
    ap.add_argument("--deployments", default="1p1d,colocated")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--slo-ttft-ms", type=float, default=400)
    ap.add_argument("--slo-tpot-ms", type=float, default=40)
    ap.add_argument("--duration-s", type=float, default=60)
    ap.add_argument("--prefill-max-num-batched-tokens", type=int, default=0,
                    help="1P1D: the prefill pool's own step budget (0: the engine's, --max-num-batched-tokens)")
    ap.add_argument("--low-duration-s", type=float, default=0, help="the low-rate run (ITL vs step time); 0: --duration-s")
    ap.add_argument("--max-queue-wait-s", type=float, default=0,
                    help="api.max_queue_wait_s of both deployments: refuse (429) what would queue longer; 0: off")
    ap.add_argument("--max-decode-step-ms", type=float, default=0,
                    help="api.max_decode_step_ms of both deployments: refuse (429) while decode steps are slower; 0: off")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--start-timeout-s", type=float, default=240)
    ap.add_argument("--out-dir", default="serve_results")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    args.rates = args.rates.split(",")
    os.makedirs(args.out_dir, exist_ok=True)
    results = {}
    if args.make_llama8b and not os.path.isdir(args.model):
        from cluster.models.make import make_llama3_8b_shape

        make_llama3_8b_shape(args.model)
    for i, name in enumerate(args.deployments.split(",")):
        try:
            results[name] = run_deployment(args, name, 8100 + i)
            print(json.dumps({name: {"goodput_vs_rate": results[name]["sweep"].get("goodput_vs_rate"),
                                     "worst_during_sweep": worst(results[name]["stalls"]["sweep"])}}), flush=True)
        except Exception as exc:  # one deployment failing must not lose the other's results
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps({name: results[name]}), flush=True)
        with open(os.path.join(args.out_dir, "serve_summary.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
