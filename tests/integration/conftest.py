"""A real uvicorn server on 127.0.0.1 serving the embedded model, shared by the tests.

Besides the session-wide `live_server`, `keyed_server` shares its loaded model behind an API
key, and `side_server` runs a second engine over the same weights (own KV cache and tiny
limits: 1 running sequence, 1 waiting request) for the 429 / 503 tests.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from app.cli import uvicorn_limits
from app.config import Settings
from app.engine.async_engine import AsyncEngine
from app.engine.engine import EngineConfig, LLMEngine
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


def start_server(settings: Settings, state: ServerState | None = None) -> LiveServer:
    port = free_port()
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    app = create_app(settings, state)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_limits(settings)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    key = settings.api_key.get_secret_value() if settings.api_key else None
    auth = {"Authorization": f"Bearer {key}"} if key else {}  # probes may be private
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.started:
            try:
                if httpx.get(f"{base_url}/ready", headers=auth, timeout=2).status_code == 200:
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


API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def keyed_server(live_server: LiveServer) -> Iterator[LiveServer]:
    """The live server's model and engine, served by a second app that needs an API key."""
    settings = live_server.state.settings.model_copy(update={"api_key": SecretStr(API_KEY)})
    live = start_server(settings, live_server.state)
    try:
        yield live
    finally:
        stop_server(live)


def side_state(
    base: ServerState, max_num_seqs: int, max_waiting: int, num_blocks: int | None = None
) -> ServerState:
    """A second engine over the same weights: its own KV cache, batch and queue limits
    (default pool: two full-length sequences)."""
    blocks = num_blocks or 2 * -(-base.n_positions // 16)
    config = EngineConfig(num_blocks=blocks, block_size=16, max_num_seqs=max_num_seqs)
    engine = LLMEngine(base.loaded.model, base.tokenizer, config)
    return ServerState(
        base.settings,
        base.loaded,
        AsyncEngine(engine, max_waiting),
        base.model_name,
        base.max_input_tokens,
        base.max_total_tokens,
    )


@pytest.fixture(scope="session")
def side_server(live_server: LiveServer) -> Iterator[LiveServer]:
    state = side_state(live_server.state, max_num_seqs=1, max_waiting=1)
    live = start_server(live_server.state.settings, state)
    try:
        yield live
    finally:
        stop_server(live)
        state.engine.stop()


def sse_events(lines: Iterable[str]) -> Iterator[Any]:
    """The JSON payloads of an SSE stream's `data:` lines (`[DONE]` as the string)."""
    for line in lines:
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            yield data if data == "[DONE]" else json.loads(data)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
