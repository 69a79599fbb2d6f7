"""Graceful shutdown: uvicorn that drains before it stops.

Kubernetes ends a pod with SIGTERM (after its preStop hook), `ray job stop` sends SIGTERM, a user
presses Ctrl-C (SIGINT). On the first of these:
  (1) the server keeps listening but admits nothing new: requests get 503 with Retry-After, and
      `/health` answers 503 `draining`, so a load balancer takes this replica out;
  (2) `drain()` (the caller's: cluster/app.py stops the autoscaler, then `OpenAIServer.drain`) waits
      for the requests in flight, up to `api.drain_timeout_s`; those still running then end with an
      error their clients see;
  (3) uvicorn then stops: the listener closes, finished streams' connections close (within
      `FINISH_WRITES_S`), and `serve()` returns to the caller, which stops the cluster.
A second signal stops at once (uvicorn's own shutdown; a third forces it). Unlike plain uvicorn, the
signal is not raised again after `serve()` returns: the caller's cleanup runs to its end.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import uvicorn

log = logging.getLogger(__name__)
FINISH_WRITES_S = 5.0  # after the drain: how long uvicorn waits for responses still being written


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[object]]):
        if config.timeout_graceful_shutdown is None:
            config.timeout_graceful_shutdown = FINISH_WRITES_S
        super().__init__(config)
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task | None = None
        self.num_signals = 0

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        """uvicorn's signal handler (main thread, between bytecodes): the first signal drains."""
        self.num_signals += 1
        if self.num_signals == 1 and self._loop is not None:
            self._loop.call_soon_threadsafe(self.begin_drain)
        elif self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    def begin_drain(self) -> None:
        """(1)-(3) of the module docstring, as a task on the server's loop (also for callers without a signal)."""
        if self.drain_task is None:
            self.drain_task = asyncio.get_running_loop().create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        try:
            await self._drain()
        except Exception:  # noqa: BLE001 - a failed drain must not keep the server up
            log.exception("drain failed; stopping now")
        finally:
            self.should_exit = True
