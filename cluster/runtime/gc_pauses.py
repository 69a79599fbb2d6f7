"""Garbage-collection pauses in a serving process.

A process that has imported torch, transformers, triton and ray holds about 400k objects that the
cyclic garbage collector tracks, and a full collection walks them all: ≈210 ms on the CI-class CPU,
while the process's step loop or HTTP streams stand still. Serving makes enough long-lived objects
(requests, token lists, deltas) to set one off every few seconds. This is the likely cause of
1P1D's 93-204 ms inter-token pauses under load on 2xH200 (docs/benchmark-history.md, serve run 3).

  - `freeze_startup_objects` moves everything alive after start-up into the permanent generation
    (`gc.freeze`, as vLLM and SGLang do). A full collection then walks only what serving made:
    ≈3 ms instead of ≈210 ms in the same process;
  - `GcPauses` times the collections that remain, for the instance's stall figures.
"""
from __future__ import annotations

import gc
import time


def freeze_startup_objects() -> int:
    """Collect once, then freeze what is left; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """The longest garbage collection of this process since the last `take_max_ms`."""

    def __init__(self):
        self.max_s = 0.0
        self._started: float | None = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.max_s = max(self.max_s, time.perf_counter() - self._started)
            self._started = None

    def take_max_ms(self) -> float:
        value, self.max_s = self.max_s * 1e3, 0.0
        return value

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
