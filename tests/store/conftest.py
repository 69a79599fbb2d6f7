"""A real redis-server for the store tests, started once per session on a free port."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from tests.procs import stop


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test` (it installs it), "
                    "or `apt-get install -y redis-server`", pytrace=False)
    import redis

    port = free_port()
    log_path = tmp_path_factory.mktemp("redis") / "redis-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.2)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                client.ping()
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"redis-server on port {port} did not answer PING; its log:\n"
                                f"{log_path.read_text(errors='replace')}", pytrace=False)
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        stop(proc)
