"""How far one streamed /v1/completions request travels through app/ (not in CI).

Starts the server on the embedded model (127.0.0.1, a free port), sends one warm-up request,
then traces a second one (`max_tokens` 8, streamed) with a profile hook on every thread: a hop
is a call from one module of app/ into another. Prints the modules the request touched and
its distinct hops in first-seen order, so a structural change can be compared before/after:

    python -m tests.benchmarks.request_hops
    PYTHONPATH=/path/to/other/checkout python -m tests.benchmarks.request_hops   # another tree
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

import app
from app.config import Settings

APP_DIR = str(Path(app.__file__).resolve().parent) + "/"
active = threading.Event()
hops: dict[tuple[str, str], None] = {}  # insertion-ordered set
touched: dict[str, None] = {}


def module_of(frame: FrameType | None) -> str | None:
    if frame is None:
        return None
    path = frame.f_code.co_filename
    if not path.startswith(APP_DIR):
        return None
    return "app/" + path[len(APP_DIR) :]


def profile(frame: FrameType, event: str, _arg: Any) -> None:
    if event != "call" or not active.is_set():
        return
    callee = module_of(frame)
    if callee is None:
        return
    touched[callee] = None
    caller = module_of(frame.f_back)
    if caller is not None and caller != callee:
        hops[(caller, callee)] = None


def streamed_completion(client: httpx.Client, model: str) -> str:
    body = {"model": model, "prompt": "대한민국은", "max_tokens": 8, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        return "".join(response.iter_lines())


def main() -> int:
    from app.state import build_state
    from tests.integration.conftest import start_server, stop_server

    threading.setprofile(profile)
    sys.setprofile(profile)
    state = build_state(Settings(num_kv_blocks=128, max_num_seqs=8))
    live = start_server(state.settings, state)
    try:
        with httpx.Client(base_url=live.base_url, timeout=60) as client:
            streamed_completion(client, state.model_name)  # warm-up: lazy imports, caches
            active.set()
            streamed_completion(client, state.model_name)
            active.clear()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
        stop_server(live)
        state.engine.stop()
    print(f"modules touched: {len(touched)}")
    for name in touched:
        print(f"  {name}")
    print(f"hops (distinct caller -> callee module pairs): {len(hops)}")
    for caller, callee in hops:
        print(f"  {caller} -> {callee}")
    crossings = [(a, b) for a, b in hops if layer(a) != layer(b)]
    print(f"layer crossings (api / engine / modeling / ... pairs): {len(crossings)}")
    for caller, callee in crossings:
        print(f"  {caller} -> {callee}")
    return 0


def layer(module: str) -> str:
    """app/api/x.py -> app/api; a top-level module (app/state.py) is its own layer."""
    parts = module.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else module


if __name__ == "__main__":
    sys.exit(main())
