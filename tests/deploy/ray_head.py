"""A Ray head of the test's own on 127.0.0.1, started with `ray start --head` and stopped by PID.

  1. every port it opens is a free one picked here (GCS, dashboard, client server, agents, metrics),
     bound to 127.0.0.1 (`--node-ip-address`, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), and its files go
     to a `--temp-dir` of its own;
  2. token authentication is on, with a token of its own passed as `RAY_AUTH_TOKEN` to the head and to
     every client (nothing is read from or written to ~/.ray/auth_token);
  3. `stop()` ends the processes whose command line names that temp dir, SIGTERM then SIGKILL: never
     `ray stop`, which would end every Ray on the machine.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time

from tests.runtime.conftest import free_port


class RayHead:
    def __init__(self, temp_dir: str, num_cpus: int = 4, dashboard: bool = True):
        """`dashboard`: the job server and state API (`ray job`, `ray list`); without it the head starts
        sooner and costs less CPU."""
        self.temp_dir = temp_dir
        self.dashboard_port = free_port()
        self.env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=secrets.token_hex(16))
        self.env.pop("RAY_ADDRESS", None)  # this head, not one a caller's environment names
        ports = {"--port": free_port(), "--dashboard-port": self.dashboard_port,
                 "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--node-manager-port": free_port(),
                 "--object-manager-port": free_port()}
        self.gcs_address = f"127.0.0.1:{ports['--port']}"
        cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--include-dashboard={str(dashboard).lower()}", f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def pids(self) -> list[int]:
        """The processes this head started: their command line names its temp dir."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:
                continue
            if self.temp_dir in cmdline:
                found.append(int(name))
        return found

    def stop(self, timeout_s: float = 10.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout_s
            while self.pids() and time.monotonic() < deadline:  # bounded
                time.sleep(0.2)
            if not self.pids():
                return
