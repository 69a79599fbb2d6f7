"""A GPU session's results against the issues' targets, as markdown: what `gpu_session.sh` brought back.

    python -m benchmarks.session_summary DIR [DIR...]     # the unpacked work/ folders of session.tar.gz

Reads what it finds in the folders: hardware.json (`benchmarks.hardware.measure`), parallel.jsonl / pp.jsonl / moe.jsonl (`benchmarks.parallel`),
disagg.json (`benchmarks.disagg`), serve/serve_summary.json (`benchmarks.serve`), gpu-tests.log. Prints, per
target, the measured figure beside it:
  TP=2 / TP=1 decode step per batch (async scheduling on and off)   target <= 0.6 at batch 64
  prefill overlap: the share of its all-reduce time it hid          target >= 50%
  PP=2 tokens/s over TP=2's at the PP batch, per partition          target >= 0.85
  MoE EP=2 vs TP=2 tokens/s per batch
  KV transfer GB/s over raw NCCL, per layer and stacked             target >= 80%
  TTFT 1P1D vs colocated, engine level and through HTTP             target <= +10%
  goodput per rate, 1P1D vs two colocated replicas; HTTP ITL vs decode step time (target <= 10% apart)
A figure whose run is missing prints as "not run", never as a number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def load(dirs: list[str]) -> dict:
    """Every result file found in `dirs` (a later folder's file of the same kind adds its records)."""
    found: dict = {"parallel": [], "disagg": None, "serve": None, "serve-admit": None, "gpu_tests": [], "hardware": None,
                   "serve_one_gpu": {}, "sender_host": None, "prefill_budget": None}
    for d in dirs:
        for name in ("parallel.jsonl", "pp.jsonl", "moe.jsonl", "shard.jsonl"):
            if os.path.exists(os.path.join(d, name)):
                found["parallel"] += _jsonl(os.path.join(d, name))
        if os.path.exists(os.path.join(d, "hardware.json")) and os.path.getsize(os.path.join(d, "hardware.json")):
            with open(os.path.join(d, "hardware.json")) as f:
                found["hardware"] = json.load(f)
        if os.path.exists(os.path.join(d, "disagg.json")):
            with open(os.path.join(d, "disagg.json")) as f:
                found["disagg"] = json.load(f)
        for kind in ("serve", "serve-admit"):  # the sweep without and with admission
            if os.path.exists(os.path.join(d, kind, "serve_summary.json")):
                with open(os.path.join(d, kind, "serve_summary.json")) as f:
                    found[kind] = json.load(f)
        for kind in sorted(os.listdir(d)) if os.path.isdir(d) else []:  # serve1-BUDGET: one GPU, per step budget
            if kind.startswith("serve1") and os.path.exists(os.path.join(d, kind, "serve_summary.json")):
                with open(os.path.join(d, kind, "serve_summary.json")) as f:
                    found["serve_one_gpu"][kind] = json.load(f)
        if os.path.exists(os.path.join(d, "prefill_budget.json")):
            with open(os.path.join(d, "prefill_budget.json")) as f:
                found["prefill_budget"] = json.load(f)
        if os.path.exists(os.path.join(d, "sender_host.json")):
            with open(os.path.join(d, "sender_host.json")) as f:
                found["sender_host"] = json.load(f)
        if os.path.exists(os.path.join(d, "gpu-tests.log")):
            with open(os.path.join(d, "gpu-tests.log")) as f:
                found["gpu_tests"] += [line.strip() for line in f if " passed" in line or " failed" in line
                                       or line.startswith(("FAILED", "ERROR"))]
    return found


def tp_ratios(records: list[dict]) -> list[dict]:
    """TP=2 ÷ TP=1 decode step per batch, async scheduling on (the engine's default) and off."""
    step = {(r["tp"], r["batch"], r["variant"], r.get("allreduce")): r["step_ms"]
            for r in records if r.get("part") == "dense" and r.get("phase") == "decode"}
    rows = []
    for batch in sorted({key[1] for key in step}):
        one, one_sync = step.get((1, batch, "single", "none")), step.get((1, batch, "single_sync", "none"))
        two, two_sync = step.get((2, batch, "overlap_off", "engine")), step.get((2, batch, "overlap_off_sync", "engine"))
        fused = step.get((2, batch, "overlap_off", "engine_fused_norm"))  # all-reduce + add + RMSNorm in one kernel
        rows.append({"batch": batch, "tp1_ms": one, "tp2_ms": two, "ratio": two / one if one and two else None,
                     "ratio_sync": two_sync / one_sync if one_sync and two_sync else None,
                     "tp2_fused_norm_ms": fused, "ratio_fused_norm": fused / one if one and fused else None})
    return rows


def prefill_overlap(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("part") == "dense" and r.get("phase") == "prefill_overlap"]


def pp_vs_tp(records: list[dict]) -> list[dict]:
    """PP=2's tokens/s (the default variant, per partition) over TP=2's at the same batch."""
    tp2 = {r["batch"]: r["tokens_per_s"] for r in records if r.get("part") == "dense" and r.get("phase") == "decode"
           and r.get("tp") == 2 and r.get("variant") == "overlap_off" and r.get("allreduce") == "engine"}
    rows = []
    for r in records:
        if r.get("part") == "pp" and r.get("variant") in ("two_batches_m1", "three_batches_m1"):
            base = tp2.get(r["batch"])
            partition = r.get("partition", "even") + (", 3 batches" if r["variant"] == "three_batches_m1" else "")
            rows.append({"partition": partition, "batch": r["batch"], "tokens_per_s": r["tokens_per_s"],
                         "tp2_tokens_per_s": base, "ratio": r["tokens_per_s"] / base if base else None,
                         "idle": r.get("bubble_fraction")})
    return rows


def moe(records: list[dict]) -> list[dict]:
    best: dict = {}
    for r in records:
        if r.get("part") == "moe" and "tokens_per_s" in r:
            key = (r["layout"], r["batch"])
            best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    return [{"batch": b, "ep2": best.get(("ep2", b)), "tp2": best.get(("tp2", b))}
            for b in sorted({b for _, b in best})]


def serve_rows(serve: dict) -> list[dict]:
    rows: dict = {}
    for deployment, result in serve.items():
        for run in result.get("sweep", {}).get("runs", []) if isinstance(result, dict) else []:
            s = run["summary"]
            rows.setdefault(run["request_rate"], {})[deployment] = (s["goodput"], s["goodput_fraction"],
                                                                    s["itl"]["p99_ms"])
    return [{"rate": rate, **by} for rate, by in sorted(rows.items())]


def itl_vs_step(serve: dict, deployment: str) -> tuple[float, float] | None:
    """(HTTP mean ITL at the low rate, the decoding instances' mean step time then) in ms."""
    result = serve.get(deployment) or {}
    low = (result.get("low_rate") or {}).get("runs") or []
    steps = [ms for sample in result.get("step_ms_samples", []) for name, ms in sample.items()
             if not name.startswith("prefill")]
    if not low or not steps:
        return None
    return low[0]["summary"]["itl"]["mean_ms"], statistics.mean(steps)


def _num(value, fmt: str = "{:.2f}") -> str:
    return "not run" if value is None else fmt.format(value)


def render(found: dict) -> str:
    out = []
    records = found["parallel"]
    hw = found["hardware"]
    out += ["## Hardware limits, measured in the session", "",
            f"- {hw['device']}: HBM {hw['hbm_gb_s']:.0f} GB/s, bf16 matmul {hw['bf16_tflops']:.0f} TFLOP/s" if hw
            else "- not run", ""]
    if found["gpu_tests"]:
        out += ["## GPU tests", *[f"    {line}" for line in found["gpu_tests"]], ""]
    out += ["## TP=2 / TP=1 decode step (target <= 0.6 at batch 64)", "",
            "| batch | TP=1 ms | TP=2 ms | TP=2/TP=1 | sync | TP=2 fused norm ms | its ratio |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['batch']} | {_num(r['tp1_ms'])} | {_num(r['tp2_ms'])} | {_num(r['ratio'])} | {_num(r['ratio_sync'])} "
            f"| {_num(r['tp2_fused_norm_ms'])} | {_num(r['ratio_fused_norm'])} |"
            for r in tp_ratios(records)] or ["| not run | | | | | | |"]
    out += ["", "## One TP=2 rank's part of the model on one GPU, no collectives (benchmarks.parallel shard)", ""]
    out += [f"- {r['phase'].replace('_ratio', '')}{'' if r['batch'] is None else ', batch ' + str(r['batch'])}: full "
            f"{r['full_ms']:.2f} ms, TP=2 rank {r['tp2_rank_ms']:.2f} ms = {r['tp2_rank_over_full']:.2f} x"
            for r in records if r.get("part") == "shard" and "tp2_rank_over_full" in r] or ["- not run"]
    out += ["", "## Prefill overlap (target: hides >= 50% of its all-reduce)", ""]
    out += [f"- {r.get('allreduce', 'engine')}: off {r['off_ms']:.1f} ms, on {r['on_ms']:.1f} ms, all-reduce "
            f"{r['allreduce_ms_per_step']:.1f} ms: hides {100 * r['share_of_allreduce_hidden']:.0f}%"
            for r in prefill_overlap(records)] or ["- not run"]
    out += ["", "## PP=2 / TP=2 tokens/s (target >= 0.85)", ""]
    # (each stage's idle share: recorded by the runs until 2026-12-07, whose engine timed its ranks)
    out += [f"- {r['partition']}, batch {r['batch']}: {r['tokens_per_s']:.0f} tokens/s = {_num(r['ratio'])} x TP=2"
            + (f"; idle per stage {', '.join(f'{100 * x:.0f}%' for x in r['idle'])}" if r["idle"] else "")
            for r in pp_vs_tp(records)] or ["- not run"]
    out += ["", "## MoE tokens/s: EP=2 vs TP=2", ""]
    out += [f"- batch {r['batch']}: EP=2 {_num(r['ep2'], '{:.0f}')}, TP=2 {_num(r['tp2'], '{:.0f}')}"
            for r in moe(records)] or ["- not run"]
    disagg = found["disagg"]
    out += ["", "## KV transfer and TTFT (targets: >= 80% of raw NCCL; TTFT <= +10%)", ""]
    if disagg:
        raw = disagg["raw_nccl"][str(disagg["kv_bytes_per_request"])]["gb_s"]
        if disagg.get("gather_device_us"):
            out.append("- one request's gathers on the device: " + ", ".join(
                f"{name} {us:.0f} us" for name, us in disagg["gather_device_us"].items()))
        for name in ("transfer_only", "transfer_stacked", "transfer_announced", "transfer_pregathered",
                     "transfer_stacked_waiter_thread", "transfer_stacked_caller_polls"):
            if name in disagg:
                t = disagg[name]
                out.append(f"- {name} ({t['messages']} messages): {t['gb_s']:.0f} GB/s = {100 * t['gb_s'] / raw:.0f}% "
                           f"of raw {raw:.0f} GB/s (landed {t['landed_ms_median']:.2f} ms){_host_split(t)}")
        out.append(f"- TTFT engine level: colocated {disagg['ttft_colocated_ms_median']:.1f} ms, 1P1D "
                   f"{disagg['ttft_1p1d_ms_median']:.1f} ms ({100 * disagg['ttft_overhead']:+.1f}%)")
    else:
        out.append("- not run")
    for kind, title in (("serve", ""), ("serve-admit", ", admission on (queue wait, decode step)")):
        out += ["", f"## Serving{title}: goodput (req/s, share meeting SLOs, ITL p99 ms) per rate", ""]
        out += _serve_lines(found[kind])
    for kind, serve in found["serve_one_gpu"].items():
        out += ["", f"## Serving on one GPU, {kind}: goodput (req/s, share meeting SLOs, ITL p99 ms) per rate", ""]
        out += _serve_lines(serve)
    out += ["", "## KV sender's host time on one GPU (benchmarks.sender_host; median / p90 us per call)", ""]
    out += _sender_host_lines(found["sender_host"])
    out += ["", "## A prefill engine's step budget on one GPU (benchmarks.prefill_budget)", ""]
    budget = found["prefill_budget"]
    out += [f"- {r['budget_tokens']} tokens a step: {r['prompt_tokens_per_s']:.0f} prompt tokens/s, step {r['step_ms']:.1f} ms; "
            f"a burst of {r['burst_prompts']}: TTFT median {r['ttft_median_ms']:.0f} ms, p90 {r['ttft_p90_ms']:.0f} ms; "
            f"lone prompt {r['lone_ttft_ms']:.1f} ms" for r in (budget or {}).get("rows", [])] or ["- not run"]
    return "\n".join(out) + "\n"


def _sender_host_lines(found: dict | None) -> list[str]:
    if not found:
        return ["- not run"]
    cases = [k for k, v in found.items() if isinstance(v, dict) and "median_us" in v]
    out = [f"- {k}: {found[k]['median_us']:.0f} / {found[k]['p90_us']:.0f}" for k in cases]
    step = found.get("in_prefill") or {}
    if step:
        out.append(f"- inside a prefill step: gather launch {step['gather_launch']['median_us']:.0f} / "
                   f"{step['gather_launch']['p90_us']:.0f}, post {step['post']['median_us']:.0f}; step "
                   f"{step['step_ms_streamed']:.1f} ms streamed vs {step['step_ms_plain']:.1f} ms plain")
    out += [f"- host op {row['op']}: {row['calls']} calls, self {row['self_cpu_us']:.0f} us"
            for row in (found.get("profile") or [])[:6]]
    return out


def _host_split(transfer: dict) -> str:
    """The sender's host time of a transfer's median run, split: announce, gathers (host), sends (and,
    in the runs of 2026-11-30 to 2026-12-01 that timed them, the posts' NCCL launch within the sends);
    and the gathers' device time."""
    runs = transfer.get("runs") or []
    if not runs or "read_us" not in runs[0]:
        return ""
    run = sorted(runs, key=lambda r: r["landed_ms"])[len(runs) // 2]
    sends = sum(run["send_us"])
    if "post_us" in run:
        posts = sum(run["post_us"][: len(run["send_us"])])
        sends_split = f"posts {posts:.0f}, rest of sends {sends - posts:.0f}"
    else:
        sends_split = f"sends {sends:.0f}"
    return (f"; posted {run['posted_ms']:.2f} ms = announce {run['announce_us']:.0f} us, gathers {sum(run['read_us']):.0f}, "
            f"{sends_split}; gathers on device {sum(run['gather_device_us']):.0f} us" + _host_cpu(run))


def _host_cpu(run: dict) -> str:
    """Of the gathers' and sends' host time, what the sender's thread spent on the CPU (the rest it waited),
    and the CPU its process's other threads took meanwhile (runs from 2026-12-01's ninth session on)."""
    if "read_cpu_us" not in run:
        return ""
    ready = ""
    if run.get("receives_posted_ms") is not None:
        ready = f"; the receiver had the manifest at {run['manifest_ms']:.2f} ms, its receives posted at {run['receives_posted_ms']:.2f}"
    return ready + (f"; on the CPU: gathers {sum(run['read_cpu_us']):.0f} of {sum(run['read_us']):.0f} us, sends "
            f"{sum(run['send_cpu_us']):.0f} of {sum(run['send_us']):.0f}, other threads {run['others_cpu_us']:.0f}")


def _worst_lines(serve: dict, names: list[str]) -> list[str]:
    """Per deployment, the worst each instance saw during the sweep (heartbeat samples): its step, its
    wait between steps, admission's estimated wait, the transfers a prefill held for confirmation."""
    from benchmarks.serve import worst as worst_of

    keys = (("max_step_ms", "step {:.0f} ms"), ("max_step_gap_ms", "gap {:.0f} ms"), ("max_land_ms", "landing {:.0f} ms"),
            ("estimated_wait_s", "est. wait {:.2f} s"), ("num_held_transfers", "held {:.0f}"), ("num_running", "running {:.0f}"))
    out = []
    for n in names:
        worst = worst_of(serve[n].get("stalls", {}).get("sweep") or [])
        cells = [f"{instance} " + ", ".join(fmt.format(figures[k]) for k, fmt in keys if figures.get(k) is not None)
                 for instance, figures in sorted(worst.items())]
        if cells:
            out.append(f"- {n}, worst per instance during the sweep: " + "; ".join(cells))
    return out


def _serve_lines(serve: dict | None) -> list[str]:
    out: list[str] = []
    if serve:
        names = [n for n in serve if isinstance(serve[n], dict) and "sweep" in serve[n]]
        for row in serve_rows(serve):
            cells = [f"{n}: {row[n][0]:.2f} ({100 * row[n][1]:.0f}%, {row[n][2]:.0f})" for n in names if n in row]
            out.append(f"- {row['rate']} req/s: " + "; ".join(cells))
        low = {n: serve[n]["low_rate"]["runs"][0]["summary"]["ttft"]["median_ms"] for n in names
               if serve[n].get("low_rate", {}).get("runs")}
        if "1p1d" in low and "colocated" in low:
            out.append(f"- low-rate TTFT median through HTTP: 1P1D {low['1p1d']:.1f} ms, colocated "
                       f"{low['colocated']:.1f} ms ({100 * (low['1p1d'] / low['colocated'] - 1):+.1f}%)")
        for n in names:
            pair = itl_vs_step(serve, n)
            if pair:
                out.append(f"- {n}: HTTP ITL {pair[0]:.2f} ms vs decode step {pair[1]:.2f} ms "
                           f"({100 * abs(pair[0] / pair[1] - 1):.1f}% apart)")
        out += _worst_lines(serve, names)
    else:
        out.append("- not run")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="unpacked work/ folders of gpu_session.sh archives")
    print(render(load(ap.parse_args(argv).dirs)), end="")


if __name__ == "__main__":
    main()
