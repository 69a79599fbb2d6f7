"""Communication hidden behind compute: two micro-batches take turns.

A layer written as a generator launches its collective asynchronously, yields,
and waits for the result only when resumed:

    def steps(x):
        pending = tp.all_reduce_async(partial(x))   # (1) launched: NCCL runs it on its own stream,
        yield                                       #     gloo on its own thread
        return x + pending.wait()                   # (3) by now mostly done

`interleave` runs one generator per micro-batch round-robin, so while micro-batch
A's all-reduce is in flight, B computes up to its own collective (2):

    A: attn ──▶ AR ·········· mlp ──▶ AR ·········· attn ...
    B:            attn ──▶ AR ·········· mlp ──▶ AR ··········

Both generators yield at the same points (the count never depends on the data), so
A's layer l always runs before B's layer l; a sequence split across A and B (a long
prefill chunk cut in two) therefore finds the KV of its first half already written.
`run_sync` drives one generator with no turn-taking (overlap off).
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass


@dataclass(frozen=True)
class OverlapFlags:
    """Which collectives yield to the other micro-batch while in flight."""

    tp: bool = False  # attention / MLP all-reduces
    ep: bool = False  # MoE dispatch, combine and gather


NO_OVERLAP = OverlapFlags()


def run_sync(gen: Generator):
    """Run a step generator to the end; its value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def interleave(gens: list[Generator]) -> list:
    """Run step generators round-robin, one turn up to each one's next yield; their values in order."""
    results: list = [None] * len(gens)
    live = list(range(len(gens)))
    while live:
        for index in list(live):
            try:
                next(gens[index])
            except StopIteration as stop:
                results[index] = stop.value
                live.remove(index)
    return results


def all_reduce_steps(group, x, overlap: bool):
    """Generator: all-reduce `x` over `group`, yielding while in flight when `overlap`."""
    pending = group.all_reduce_async(x)
    if overlap and group.size > 1:
        yield
    return pending.wait()
