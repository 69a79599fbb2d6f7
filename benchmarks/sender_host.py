"""Where the KV sender's host time goes, on one GPU (no peer needed): the gathers alone.

    python -m benchmarks.sender_host --model DIR [--make-llama8b] --out sender_host.json

On 2xH200 (2026-11-30) a stacked gather's launch held the prefill's host 250-600 us and an NCCL post
60-100 us, where a kernel launch takes about 20. This separates what one GPU can tell apart, each
case timed per call on the host (median and p90 of the calls, microseconds), the device idle before
each case:
  (1) `gather_group`   one 64 MiB group of layers into a staging slot (`read_kv_layers`, as
                       a prefill worker gathers a group), the request's four groups in turn;
  (2) `gather_layer`   one layer into a fresh tensor (`read_kv`);
  (3) `block_index`    a request's blocks as a device index (pinned, asynchronous);
  (4) the same gathers with a thread beside them that polls a CUDA event and sleeps, as the link's
      send waiter does (50 us: its poll until 2026-11-30; 1 ms: since), and one that spins in Python
      (the worst neighbour: it gives the GIL up only when the interpreter makes it);
  (5) `in_prefill`     a real prefill step of the prompt through `PrefillWorker` with a transport
                       that keeps each message (no network): the step's wall time beside the same step
                       without streaming, the host time of each post, and, in runs of their own under a
                       profile hook (`sys.setprofile`: it costs every call a little), of each group's
                       gather inside the step's forward;
  (6) `profile`        torch.profiler's host ops of four group gathers: which op holds the host;
  (7) `nccl_*`         each group gathered and then posted as the transport posts it (a broadcast on
                       an NCCL group: here a one-rank group, no peer on one GPU, so ProcessGroupNCCL's
                       host side and threads but no transfer), its sends waited on by a thread (first
                       look after 1 ms, or 50 us: how the link's waiter thread once waited on NCCL sends)
                       or by nobody (the transport counts NCCL sends when asked: torchdist.py (4)): the
                       gather's and the post's host time each.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import threading
import time

import torch

from benchmarks.disagg import _engine
from cluster.config import DisaggConfig
from cluster.disagg.roles import RequestSpec
from cluster.disagg.transfer.base import TransferState
from cluster.types import Role, SamplingParams


def _stats(us: list[float]) -> dict:
    s = sorted(us)
    return {"calls": len(s), "median_us": s[len(s) // 2], "p90_us": s[int(len(s) * 0.9)], "max_us": s[-1]}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _host_us(fn, calls: int) -> dict:
    _sync()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    _sync()
    return _stats(times[1:])


class _Neighbour:
    """A thread beside the gathers: polls a CUDA event every `pause_s` (as the link's send waiter polls
    its sends), or with `pause_s` 0 spins in Python."""

    def __init__(self, pause_s: float):
        self.pause_s, self.stop = pause_s, threading.Event()
        self.event = torch.cuda.Event() if torch.cuda.is_available() else None
        if self.event is not None:
            self.event.record()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            if self.pause_s:
                if self.event is not None:
                    self.event.query()
                time.sleep(self.pause_s)
            else:
                n += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class _Slot:
    """A staging slot handed to the NCCL cases: told which send reads it."""

    def __init__(self, ring, slot):
        self.ring, self.slot = ring, slot

    def sent(self, work) -> None:
        self.ring.sent(self.slot, work)


class _KeepingTransport:
    """Takes each message and keeps it (no network); stamps each post's host time."""

    def __init__(self):
        self.kept, self.post_us = {}, []

    def announce(self, peer_id, messages) -> None:
        pass

    def send_layer(self, peer_id, transfer_id, layer_id, num_layers, kv):
        t = time.perf_counter()
        self.kept[(transfer_id, layer_id)] = kv
        self.post_us.append((time.perf_counter() - t) * 1e6)
        return None

    def send_state(self, transfer_id) -> TransferState:
        return TransferState.DONE

    def forget(self, transfer_id) -> None:
        self.kept = {k: v for k, v in self.kept.items() if k[0] != transfer_id}


def _submitted(repeats: int, submit, done):
    """Yields once per run (`repeats` + 1, the first a warm-up) after `submit(i)`; `done(i)` after each."""
    for i in range(repeats + 1):
        submit(i)
        yield i
        done(i)


def _first_token_ms(step) -> float:
    """Wall time of `step()` calls until one returns deltas (the prompt's first token)."""
    _sync()
    t = time.perf_counter()
    while not step():
        pass
    _sync()
    return (time.perf_counter() - t) * 1e3


def _confirmed(worker, request_id: str) -> None:
    worker.confirm(request_id)
    while worker.plans:
        worker.poll()


def _call_times_us(fn, run) -> list[float]:
    """Host time of each call of `fn` made on this thread while `run()` runs, stamped by a profile hook
    (`sys.setprofile`): the product is not patched, but every call pays for the hook, so `run`'s own
    time is not one to keep."""
    code = inspect.unwrap(fn).__code__  # the function itself, past decorators (torch.inference_mode)
    started, times = [], []

    def hook(frame, event, _arg):
        if frame.f_code is code and event in ("call", "return"):
            if event == "call":
                started.append(time.perf_counter())
            else:
                times.append((time.perf_counter() - started.pop()) * 1e6)

    sys.setprofile(hook)
    try:
        run()
    finally:
        sys.setprofile(None)
    return times


def _in_prefill(args, engine, prompt: list[int], params) -> dict:
    """A prefill step of `prompt` streamed through PrefillWorker (its gathers inside the forward), beside
    the same step without streaming (the worker stays registered: with nothing to send it hooks nothing)."""
    from cluster.disagg.prefill import PrefillWorker
    from cluster.engine.runner import ModelRunner

    transport = _KeepingTransport()
    worker = PrefillWorker(engine, transport, DisaggConfig())

    def streamed_runs(tag: str, first_id: int) -> list[float]:
        return [_first_token_ms(worker.step) for _ in _submitted(args.repeats, lambda i: worker.submit_prefill(
            RequestSpec(f"{tag}{i}", prompt, params), "D", first_id + i), lambda i: _confirmed(worker, f"{tag}{i}"))]

    streamed = streamed_runs("s", 1)
    post_us, transport.post_us = transport.post_us, []
    gather_us = _call_times_us(ModelRunner.read_kv_layers, lambda: streamed_runs("g", 1000))
    plain = [_first_token_ms(engine.step) for _ in _submitted(args.repeats, lambda i: engine.add_request(
        f"p{i}", prompt, params), lambda i: engine.release(f"p{i}"))]
    return {"gather_launch": _stats(gather_us), "post": _stats(post_us),
            "step_ms_streamed": sorted(streamed[1:])[len(streamed[1:]) // 2],
            "step_ms_plain": sorted(plain[1:])[len(plain[1:]) // 2]}


def _profile(gather_all) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gather_all()
    _sync()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return [{"op": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total} for e in rows]


def _nccl_cases(gather_into, groups: list, calls: int) -> dict:
    """(7): gather then post each group, with the sends waited on by a thread (first look `pause`,
    doubling to 4 ms) or by nobody."""
    import datetime
    import queue

    import torch.distributed as dist
    from torch._C._distributed_c10d import BroadcastOptions

    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True  # as a KV link's group (parallel/groups.py pair_group)
    options._timeout = datetime.timedelta(seconds=60)
    group = dist.ProcessGroupNCCL(dist.PrefixStore("sender-host", dist.HashStore()), 0, 1, options)
    opts = BroadcastOptions()
    opts.rootRank = 0
    out = {}
    for name, pause in (("nccl_no_waiter", None), ("nccl_waiter_1ms", 1e-3), ("nccl_waiter_50us", 50e-6)):
        sends: queue.SimpleQueue = queue.SimpleQueue()

        def waiter():
            while (work := sends.get()) is not None:
                wait = pause
                while not work.is_completed():
                    time.sleep(wait)
                    wait = min(wait * 2, 4e-3)

        thread = threading.Thread(target=waiter, daemon=True) if pause else None
        if thread:
            thread.start()
        gather_us, post_us = [], []
        _sync()
        for call in range(calls):
            t0 = time.perf_counter()
            slot, buf = gather_into(groups[call % len(groups)])
            t1 = time.perf_counter()
            work = group.broadcast([buf], opts)
            post_us.append((time.perf_counter() - t1) * 1e6)
            gather_us.append((t1 - t0) * 1e6)
            slot.sent(work)
            if thread:
                sends.put(work)
        _sync()
        if thread:
            sends.put(None)
            thread.join()
        out[f"{name}_gather"], out[f"{name}_post"] = _stats(gather_us[1:]), _stats(post_us[1:])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--make-llama8b", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=41)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="sender_host.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a plumbing check")
    args = ap.parse_args(argv)
    if args.make_llama8b and not os.path.isdir(args.model):
        from cluster.models.make import make_llama3_8b_shape

        make_llama3_8b_shape(args.model)
    from cluster.disagg.prefill import GROUP_BYTES, STAGING_SLOTS
    from cluster.disagg.staging import StagingRing

    engine = _engine(args.model, Role.PREFILL, 0, args.device)
    runner = engine.runner
    prompt = [100 + (i * 7) % min(5000, engine.arch.vocab_size - 200) for i in range(args.prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    out: dict = {"prompt_len": args.prompt_len, "switch_interval_s": __import__("sys").getswitchinterval()}
    out["in_prefill"] = _in_prefill(args, engine, prompt, params)
    engine.add_request("held", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # its KV stays
    while not engine.step():
        pass
    seq = engine.requests["held"].seqs[0]
    block_ids = seq.block_ids[: -(-len(prompt) // engine.kv.block_size)]
    index = runner.block_index(block_ids)
    one_layer = tuple(runner.read_kv(runner.first_kv_layer, index).shape)
    per_group = max(1, GROUP_BYTES // (torch.Size(one_layer).numel() * engine.runner.kv_stack.element_size()))
    groups = [(s, min(s + per_group, engine.arch.num_layers)) for s in range(0, engine.arch.num_layers, per_group)]
    ring = StagingRing(engine.device, GROUP_BYTES, STAGING_SLOTS)
    turn = [0]

    def gather_group():
        start, end = groups[turn[0] % len(groups)]
        turn[0] += 1
        slot, buf = ring.take((end - start, *one_layer), runner.kv_stack.dtype)
        runner.read_kv_layers(start, end, index, buf)
        ring.sent(slot, None)

    layer = [0]

    def gather_layer():
        runner.read_kv(layer[0] % engine.arch.num_layers, index)
        layer[0] += 1

    out["groups"] = groups
    out["gather_group"] = _host_us(gather_group, args.calls)
    out["gather_layer"] = _host_us(gather_layer, args.calls)
    out["block_index"] = _host_us(lambda: runner.block_index(block_ids), args.calls)
    out["kernel_launch"] = _host_us(lambda: torch.add(index, 1), args.calls)  # the floor: one small kernel
    for name, pause in (("waiter_50us", 50e-6), ("waiter_1ms", 1e-3), ("python_spinner", 0.0)):
        with _Neighbour(pause):
            out[f"gather_group_{name}"] = _host_us(gather_group, args.calls)
    out["profile"] = _profile(lambda: [gather_group() for _ in groups]) if args.device == "cuda" else []
    if args.device == "cuda":

        def gather_into(group):
            start, end = group
            slot, buf = ring.take((end - start, *one_layer), runner.kv_stack.dtype)
            runner.read_kv_layers(start, end, index, buf)
            return _Slot(ring, slot), buf

        out.update(_nccl_cases(gather_into, groups, args.calls))
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
