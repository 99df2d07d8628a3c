"""A real uvicorn server on 127.0.0.1 serving the embedded model, shared by the tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from app.config import Settings
from app.main import create_app
from app.state import ServerState


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    base_url: str
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def state(self) -> ServerState:
        return self.server.config.app.state.server  # type: ignore[no-any-return, attr-defined]

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the engine has no work (aborts are processed asynchronously)."""
        engine = self.state.engine.engine
        deadline = time.monotonic() + timeout
        while engine.has_unfinished() or self.state.engine.num_active:
            if time.monotonic() > deadline:
                raise AssertionError("engine did not become idle")
            time.sleep(0.02)


def start_server(settings: Settings) -> LiveServer:
    port = free_port()
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.started:
            try:
                if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                    return LiveServer(base_url, server, thread)
            except httpx.HTTPError:
                pass
        if not thread.is_alive():
            raise RuntimeError("server thread died during start-up")
        time.sleep(0.1)
    raise RuntimeError("server did not become ready in 120 s")


def stop_server(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(30)


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    live = start_server(Settings(num_kv_blocks=512, max_num_seqs=64))
    try:
        yield live
    finally:
        stop_server(live)


@pytest.fixture()
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, timeout=60) as c:
        yield c
