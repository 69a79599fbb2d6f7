"""The processes of an instance's ranks 1..N-1 (the driver process is rank 0): started, watched, ended.

`MultiProcExecutor` (executor.py) has one. A rank that fails reports its error under `error/<rank>`
in the instance's rendezvous store before it exits (worker.py, `worker_main`); `dead` puts the
likeliest root cause first: a rank killed by a signal, then one that exited on its own, then the
ranks whose errors are mostly the echo of another's death.
"""
from __future__ import annotations

import os
import signal
import time

import torch

from cluster.engine.worker import worker_main

JOIN_TIMEOUT_S = 5.0
MAX_ERROR_CHARS = 300


class RankProcesses:
    def __init__(self, config, store, max_model_len: int, channel_spec):
        context = torch.multiprocessing.get_context("spawn")
        self.store = store
        self.procs = [context.Process(target=worker_main, name=f"llm-cluster-rank{rank}", daemon=True,
                                      args=(rank, config, store.port, os.getpid(), max_model_len, channel_spec))
                      for rank in range(1, config.parallel.world_size)]
        for proc in self.procs:
            proc.start()

    def any_exited(self) -> bool:
        return any(proc.exitcode is not None for proc in self.procs)

    def dead(self, wait_s: float = 0.0) -> str:
        """'' if every rank lives, else which died and why (waiting up to wait_s for the exit to show)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [(rank, proc) for rank, proc in enumerate(self.procs, start=1) if proc.exitcode is not None]
            if dead or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        # a rank that was killed or exited on its own comes first: the others' errors are mostly its echo
        reasons = sorted((self._why(rank, proc.exitcode), rank, proc.pid) for rank, proc in dead)
        return "; ".join(f"rank {rank} (pid {pid}) {why}" for (_, why), rank, pid in reasons)

    def _why(self, rank: int, exitcode: int) -> tuple[int, str]:
        """(how likely the root cause: 0 most, text)."""
        if exitcode < 0:
            return 0, f"was killed by {signal.Signals(-exitcode).name}"
        key = f"error/{rank}"
        try:
            if self.store.check([key]):
                return 2, f"failed: {self.store.get(key).decode()[:MAX_ERROR_CHARS]}"
        except Exception:  # the store itself may be unusable by now
            pass
        return 1, f"exited with code {exitcode}"

    def join(self, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Wait up to `timeout_s` in all for the ranks to leave on their own."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        """End every rank still running, and wait for it."""
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self.procs:
            proc.join(JOIN_TIMEOUT_S)
