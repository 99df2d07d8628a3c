"""A real server subprocess (`python -m app.cli`) on 127.0.0.1, for scripts and tests.

Shared by the HTTP benchmark, the soak run and the lifecycle tests: start it on a free port,
wait until /ready answers 200 (or fail with the tail of its log), stop it with SIGTERM.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The server exited during start-up or was not ready in time (message: its log tail)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    args: list[str],
    *,
    threads: int = 0,
    log: Path | None = None,
    timeout: float = 300.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m app.cli ARGS --host 127.0.0.1 --port <free>`; return it and its URL
    once /ready answers 200. Output goes to `log` (a temporary file when None); `threads`
    sets torch's intra-op threads in the server (OMP_NUM_THREADS) when non-zero."""
    port = free_port()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if log is None:
        log = Path(tempfile.mkstemp(prefix="kogpt-server-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "app.cli", *args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"server exited ({proc.returncode}) during start-up:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    proc.wait()
    raise ServerStartError(f"server not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM (graceful drain), then SIGKILL after `timeout`; the exit status."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
