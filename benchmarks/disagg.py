"""Disaggregation on two GPUs: KV transfer bandwidth and TTFT, prefill on GPU 0, decode on GPU 1.

    python -m benchmarks.disagg --model DIR [--make-llama8b] --out disagg.json

Two processes (no Ray needed for the measurement), each with an engine on its GPU and
a KV link made on demand by our transport (NCCL, one group for the pair):
  (1) raw NCCL on that same link (a broadcast from prefill to decode, as the transport sends): one layer's KV of a `--prompt-len` prompt
      and all layers in one message (the hardware-path reference);
  (2) our transfer of one request's KV (gather blocks -> send per layer -> recv ->
      scatter into reserved blocks), back to back: bandwidth beside (1), both against one
      message of all the KV and against the same per-layer messages sent raw (`transfer_only`:
      one layer a message, how the prefill streamed before); and the same with the layers
      stacked into messages of up to 64 MiB, one gather each (`transfer_stacked`: how a
      prefill streams its KV now, one rank or several);
  (3) TTFT of one `--prompt-len` prompt with layer-wise streaming to decode (1P1D) vs the
      same engine without a transfer (colocated), and time to the second token on decode.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch
import torch.multiprocessing as mp
from torch._C._distributed_c10d import BroadcastOptions

from benchmarks.sender_probes import event_pair, gather_device_us, stacked_groups
from cluster.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig, SchedulerConfig
from cluster.disagg.roles import RequestSpec
from cluster.disagg.transfer.base import TransferState
from cluster.types import Role, SamplingParams


def _engine(model: str, role: Role, gpu: int, device: str = "cuda"):
    from cluster.config import RunnerConfig
    from cluster.engine.engine import Engine

    if device == "cuda":
        torch.cuda.set_device(gpu)
    cfg = EngineConfig(model=ModelConfig(path=model, dtype="bfloat16" if device == "cuda" else "float32", max_model_len=None),
                       runner=RunnerConfig(device=device),
                       cache=CacheConfig(gpu_memory_fraction=0.8, enable_prefix_caching=False),
                       scheduler=SchedulerConfig(max_num_batched_tokens=8192))
    return Engine(cfg, role=role, progress=False)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _cuda_time(fn, iters: int) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - t0) / iters


DEVICE = ["cuda"]


def _say(side: str, what: str) -> None:
    """Progress lines, so a hang shows where it stopped (the first GPU run hung without a word)."""
    print(f"[{time.strftime('%H:%M:%S')}] {side}: {what}", flush=True)


def _raw_nccl(group, my_rank: int, sizes: list[int], iters: int = 10) -> dict:
    out = {}
    for size in sizes:
        buf = torch.empty(size, dtype=torch.uint8, device=DEVICE[0])

        def once():  # what the transport's payload is on NCCL: a broadcast rooted at the sender
            opts = BroadcastOptions()
            opts.rootRank = 1  # the prefill side
            group.broadcast([buf], opts).wait()

        once()
        seconds = _cuda_time(once, iters)
        out[str(size)] = {"bytes": size, "ms": seconds * 1e3, "gb_s": size / seconds / 1e9}
    return out


def _raw_nccl_layers(group, layer_bytes: int, num_layers: int, iters: int = 5) -> dict:
    """The request's KV the way the transport moves it, one message per layer back to back, raw:
    the hardware path's figure for the same traffic (per-message costs included)."""
    bufs = [torch.empty(layer_bytes, dtype=torch.uint8, device=DEVICE[0]) for _ in range(num_layers)]
    opts = BroadcastOptions()
    opts.rootRank = 1  # the prefill side

    def once():
        works = [group.broadcast([buf], opts) for buf in bufs]
        for work in works:
            work.wait()

    once()
    seconds = _cuda_time(once, iters)
    total = layer_bytes * num_layers
    return {"bytes": total, "messages": num_layers, "ms": seconds * 1e3, "gb_s": total / seconds / 1e9}


def prefill_main(args, q_to_decode, q_from_decode, results):
    from cluster.disagg.prefill import PrefillWorker
    from cluster.disagg.transfer.torchdist import TorchDistTransport

    DEVICE[0] = args.device
    engine = _engine(args.model, Role.PREFILL, 0, args.device)
    transport = TorchDistTransport("P", backend=engine.platform.dist_backend, timeout_s=60)
    worker = PrefillWorker(engine, transport, DisaggConfig(transfer_timeout_s=60))
    _say("prefill", "engine ready; connecting")
    transport.connect("D", q_from_decode.get(), is_master=False)
    _say("prefill", "link made; raw send/recv")
    link = transport.links["D"]
    layer_bytes = _layer_bytes(engine, args.prompt_len)
    sizes = [layer_bytes, layer_bytes * engine.arch.num_layers]
    results["raw_nccl"] = _raw_nccl(link.group, link.my_rank, sizes)
    results["raw_nccl_per_layer"] = _raw_nccl_layers(link.group, layer_bytes, engine.arch.num_layers)
    _say("prefill", "raw send/recv done")
    prompt = [100 + (i * 7) % min(5000, engine.arch.vocab_size - 200) for i in range(args.prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    # colocated TTFT: the same engine, no transfer
    ttft_colo = []
    for i in range(args.repeats + 1):
        engine.add_request(f"c{i}", prompt, params)
        t0 = time.perf_counter()
        while not engine.step():
            pass
        ttft_colo.append(time.perf_counter() - t0)
        engine.release(f"c{i}")
    # 1P1D: layer-wise streaming to decode; decode reserved its blocks first
    ttft_disagg = []
    for i in range(args.repeats + 1):
        q_to_decode.put(("reserve", i, prompt))
        assert q_from_decode.get() == "reserved"
        worker.submit_prefill(RequestSpec(f"d{i}", prompt, params), "D", i + 1)
        t0 = time.perf_counter()
        while not worker.step():
            pass
        ttft_disagg.append(time.perf_counter() - t0)
        assert q_from_decode.get() == "landed"
        worker.confirm(f"d{i}")
        while worker.plans:
            worker.poll()
    results["ttft_colocated_ms"] = [t * 1e3 for t in ttft_colo[1:]]
    results["ttft_1p1d_ms"] = [t * 1e3 for t in ttft_disagg[1:]]
    results["kv_bytes_per_request"] = layer_bytes * engine.arch.num_layers
    # our transfer path alone, back to back: one request's KV, every layer, `--repeats` times. Both
    # sides stamp time.monotonic() (one clock for every process of the host): from the announce to
    # the decode side's receiver seeing the last message (`landed`), and to the KV scattered into
    # the reserved blocks (`joined`); the queue hand-shakes of this script stay outside
    engine.add_request("t", prompt, params)
    while not engine.step():
        pass
    seq = engine.requests["t"].seqs[0]
    plan_blocks = seq.block_ids[: -(-len(prompt) // engine.kv.block_size)]
    index = engine.runner.block_index(plan_blocks)
    shape = tuple(engine.runner.read_kv(0, index).shape)
    first = torch.tensor([seq.token_ids[-1]], device=engine.device)
    nbytes = layer_bytes * engine.arch.num_layers
    # per layer: as the prefill streamed before 2026-11-30; stacked: as it streams now, in groups of layers
    # (up to prefill.GROUP_BYTES a message), one rank or several
    # (`transfer_announced`: the stacked messages announced 2 ms before the clock starts, as a prefill
    # announces a step's messages before the step computes, so the decode side has posted its receives;
    # `transfer_pregathered`: also gathered, and the device synchronised, before the clock starts: the
    # transport's own part, posting to landing, with no gather under it)
    groups = stacked_groups(engine, len(prompt), engine.kv_layout.dtype)
    results["gather_device_us"] = gather_device_us(engine, index, groups)
    variants = (("transfer_only", [(layer, layer + 1) for layer in range(engine.arch.num_layers)], False, False),
                ("transfer_stacked", groups, False, False),
                ("transfer_announced", groups, False, True),
                ("transfer_pregathered", groups, True, True))
    # round by round, one transfer of each variant a round, the order turned each round: in one variant
    # after another, the variant timed last measured 50% of raw NCCL against the first's 37%; interleaved, in
    # the next run, their order reversed (2xH200, 2026-12-01 runs 9 and 10)
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    tids = itertools.count(1000)
    for rnd in range(args.repeats + 1):  # round 0 warms each variant up (allocations) and is not kept
        for name, messages, pregather, ahead in variants[rnd % len(variants):] + variants[:rnd % len(variants)]:
            run = _transfer_run(args, engine, transport, worker, q_to_decode, q_from_decode, prompt, index, shape,
                                first, messages, next(tids), pregather=pregather, ahead=ahead)
            if rnd:
                runs[name].append(run)
    for name, messages, *_ in variants:
        landed = sorted(r["landed_ms"] for r in runs[name])[len(runs[name]) // 2]
        joined = sorted(r["joined_ms"] for r in runs[name])[len(runs[name]) // 2]
        results[name] = {"bytes": nbytes, "messages": len(messages) + 1, "runs": runs[name], "landed_ms_median": landed,
                         "joined_ms_median": joined, "gb_s": nbytes / (landed / 1e3) / 1e9,
                         "gb_s_to_joined": nbytes / (joined / 1e3) / 1e9}
    _say("prefill", "transfer-only done")
    q_to_decode.put(("stop", 0, None))


def _transfer_run(args, engine, transport, worker, q_to_decode, q_from_decode, prompt, index, shape, first, groups,
                  tid: int, pregather: bool = False, ahead: bool = False) -> dict:
    """One request's KV, every layer, sent as `groups` (layer ranges stacked into one message each), then
    the first token; both sides stamp it. `pregather`: the messages are gathered before the clock starts;
    `ahead`: announced 2 ms before it."""
    count = len(groups) + 1
    stacked = any(end - start > 1 for start, end in groups)
    q_to_decode.put(("expect", tid, prompt))
    assert q_from_decode.get() == "reserved"
    ready = [engine.runner.read_kv_layers(start, end, index) for start, end in groups] if pregather else None
    manifest = [(tid, i, count, (end - start, *shape) if stacked else shape, engine.kv_layout.dtype)
                for i, (start, end) in enumerate(groups)] + [(tid, count - 1, count, (1,), torch.int64)]
    if ahead:
        transport.announce("D", manifest)
        time.sleep(0.002)
    pairs = [event_pair(engine.device) for _ in groups]  # made before the clock: only records inside it
    _sync()
    t0 = time.monotonic()
    if not ahead:
        transport.announce("D", manifest)
    announced = time.monotonic()
    read_us, send_us, gathers = [], [], []  # where the sender's host time goes, message by message
    # ... and how much of it this thread spent on the CPU (the rest it waited: for the GIL, a lock, the
    # driver), and how much CPU the process's other threads took meanwhile: on 2xH200 a gather's launch
    # held the host 150-330 us where one H200 alone measured 76 (2026-12-01 run 10)
    read_cpu_us, send_cpu_us = [], []
    loop_cpu0, loop_thread0 = time.process_time(), time.thread_time()
    for i, (start, end) in enumerate(groups):
        t1, c1 = time.monotonic(), time.thread_time()
        events = pairs[i]
        if events:
            events[0].record()
        slot = None
        if ready is not None:
            kv = ready[i]
        elif stacked:  # as the prefill worker sends a group: into a staging slot on a GPU
            slot, out = worker.sender.staging.take((end - start, *shape), engine.kv_layout.dtype) if worker.sender.staging else (None, None)
            kv = engine.runner.read_kv_layers(start, end, index, out)
        else:
            kv = engine.runner.read_kv(start, index)
        if events:
            events[1].record()
            gathers.append(events)
        t2, c2 = time.monotonic(), time.thread_time()
        work = transport.send_layer("D", tid, i, count, kv)
        if worker.sender.staging is not None:
            worker.sender.staging.sent(slot, work)
        read_us.append((t2 - t1) * 1e6)
        send_us.append((time.monotonic() - t2) * 1e6)
        read_cpu_us.append((c2 - c1) * 1e6)
        send_cpu_us.append((time.thread_time() - c2) * 1e6)
    transport.send_layer("D", tid, count - 1, count, first)
    posted = time.monotonic()
    others_cpu_us = ((time.process_time() - loop_cpu0) - (time.thread_time() - loop_thread0)) * 1e6
    sent = _sent_s(transport, tid)
    stamps = q_from_decode.get()
    run = {"posted_ms": (posted - t0) * 1e3, "sent_ms": (sent - t0) * 1e3 if sent else None,
           "landed_ms": (stamps["landed_s"] - t0) * 1e3, "joined_ms": (stamps["joined_s"] - t0) * 1e3,
           "announce_us": (announced - t0) * 1e6, "read_us": read_us, "send_us": send_us,
           "read_cpu_us": read_cpu_us, "send_cpu_us": send_cpu_us, "others_cpu_us": others_cpu_us,
           "gather_device_us": [a.elapsed_time(b) * 1e3 for a, b in gathers]}
    return run


def _sent_s(transport, tid: int, timeout_s: float = 10.0) -> float | None:
    """When `send_state` first says every send of `tid` is done, asked every 0.1 ms (an NCCL link's
    sends are counted when asked, as the prefill's step loop asks); None if it failed or never did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = transport.send_state(tid)
        if state in (TransferState.DONE, TransferState.FAILED):
            return time.monotonic() if state == TransferState.DONE else None
        time.sleep(1e-4)
    return None


def decode_main(args, q_to_decode, q_from_decode, results):
    from cluster.disagg.decode import DecodeWorker
    from cluster.disagg.transfer.torchdist import TorchDistTransport

    DEVICE[0] = args.device
    engine = _engine(args.model, Role.DECODE, 1, args.device)
    transport = TorchDistTransport("D", backend=engine.platform.dist_backend, timeout_s=60)
    worker = DecodeWorker(engine, transport, DisaggConfig(transfer_timeout_s=60))
    q_from_decode.put(transport.listen())
    _say("decode", "engine ready; connecting")
    transport.connect("P", transport.listen(), is_master=True)
    _say("decode", "link made; raw send/recv")
    link = transport.links["P"]
    layer_bytes = _layer_bytes(engine, args.prompt_len)
    _raw_nccl(link.group, link.my_rank, [layer_bytes, layer_bytes * engine.arch.num_layers])
    _raw_nccl_layers(link.group, layer_bytes, engine.arch.num_layers)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    second_token_ms = []
    ended: list[float] = []  # when the transport said a transfer this side expects ended (its receiver's thread)
    transport.on_ready = lambda: ended.append(time.monotonic())  # the hook an instance's loop wakes on
    while True:
        cmd, i, prompt = q_to_decode.get()
        if cmd == "stop":
            break
        rid = f"d{i}" if cmd == "reserve" else f"t{i}"
        tid = i + 1 if cmd == "reserve" else i
        ended.clear()
        assert worker.reserve(RequestSpec(rid, prompt, params), "P", tid)
        t0 = time.perf_counter()
        q_from_decode.put("reserved")
        while rid in worker.pending:
            worker.poll()
            time.sleep(0.0002)  # a busy loop would hold the GIL the link's receiver thread needs
        if cmd == "expect":
            _sync()  # the scatter into the reserved blocks is done
            q_from_decode.put({"landed_s": ended[0], "joined_s": time.monotonic()})
            engine.abort(rid)
            continue
        q_from_decode.put("landed")
        while not worker.step():
            pass
        second_token_ms.append((time.perf_counter() - t0) * 1e3)
        while engine.has_unfinished():
            worker.step()
    results["time_to_second_token_1p1d_ms"] = second_token_ms[1:]


def _layer_bytes(engine, num_tokens: int) -> int:
    k = next(c for c in engine.runner.kv_caches if c is not None)[0]
    num_blocks = -(-num_tokens // engine.kv.block_size)
    return 2 * num_blocks * k[0].numel() * k.element_size()


def _run(fn, args, q1, q2, results):
    if args.dump_stacks_after_s:  # a hang shows every thread's Python stack instead of nothing
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(args.dump_stacks_after_s, repeat=True, file=sys.stderr)
    try:
        fn(args, q1, q2, results)
    except Exception as exc:  # report, don't hang the other side
        import traceback

        results["error"] = traceback.format_exc()
        q2.put(f"error: {exc}")
        q1.put(("stop", 0, None))
        raise


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--make-llama8b", action="store_true", help="make the checkpoint at --model first if missing")
    ap.add_argument("--layers", type=int, default=32, help="with --make-llama8b: layers (32 is the real depth)")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="disagg_bench.json")
    ap.add_argument("--dump-stacks-after-s", type=float, default=0, help="print all threads' stacks every N s")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo plumbing check")
    args = ap.parse_args(argv)
    if args.make_llama8b and not os.path.isdir(args.model):
        from cluster.models.make import make_llama3_8b_shape

        make_llama3_8b_shape(args.model, args.layers)
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    q1, q2 = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_run, args=(prefill_main, args, q1, q2, results)),
             ctx.Process(target=_run, args=(decode_main, args, q1, q2, results))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    out = dict(results)
    raw = out.get("raw_nccl", {})
    if raw and "transfer_only" in out:
        whole = raw[str(out["kv_bytes_per_request"])]["gb_s"]
        out["transfer_vs_raw_nccl"] = out["transfer_only"]["gb_s"] / whole  # vs one message of all the KV
        if "raw_nccl_per_layer" in out:  # vs the same messages, raw
            out["transfer_vs_raw_nccl_per_layer"] = out["transfer_only"]["gb_s"] / out["raw_nccl_per_layer"]["gb_s"]
    for key in ("ttft_colocated_ms", "ttft_1p1d_ms"):
        if out.get(key):
            out[key + "_median"] = sorted(out[key])[len(out[key]) // 2]
    if out.get("ttft_colocated_ms_median") and out.get("ttft_1p1d_ms_median"):
        out["ttft_overhead"] = out["ttft_1p1d_ms_median"] / out["ttft_colocated_ms_median"] - 1
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
