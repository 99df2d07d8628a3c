"""SIGTERM in the middle of mixed load: everything in flight completes, new work gets 503,
and the process exits 0 once drained, well inside the grace period.

test_lifecycle.py covers the other half (requests still running when the grace period ends
are cut with a final 503 event); this one uses its `_serve` helper (a `python -m app.cli`
subprocess on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import signal
import threading

import httpx

from tests.integration.conftest import LiveServer, metric
from tests.integration.mixed_requests import Outcome, build_cases, run_all
from tests.integration.test_lifecycle import _serve

GRACE_SECONDS = 60.0  # far more than the load needs: nothing may be cut
NUM_REQUESTS = 24


def engine_counts(url: str) -> tuple[float, float]:
    """(requests in the engine now, requests past admission: in the engine or finished)."""
    text = httpx.get(f"{url}/metrics").text
    now = metric(text, "kogpt_requests_running") + metric(text, "kogpt_requests_waiting")
    return now, now + metric(text, "kogpt_request_finish_total")


def test_sigterm_during_load_finishes_in_flight_and_exits_zero(live_server: LiveServer) -> None:
    proc, url = _serve(live_server.state.settings.model, grace=GRACE_SECONDS)
    try:
        cases = build_cases(NUM_REQUESTS, 64, seed=61)
        outcomes: list[Outcome] = []
        load = threading.Thread(
            target=lambda: outcomes.extend(asyncio.run(run_all(url, cases, NUM_REQUESTS)))
        )
        load.start()
        in_flight, admitted = 0.0, 0.0
        while admitted < NUM_REQUESTS and load.is_alive():  # all admitted: none may get 503
            in_flight, admitted = engine_counts(url)
        proc.send_signal(signal.SIGTERM)
        assert in_flight > 0  # the signal came while requests were running
        for _ in range(6000):
            if httpx.get(f"{url}/ready").status_code == 503:
                break
        assert httpx.get(f"{url}/ready").json() == {"status": "draining"}
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "국민", "max_tokens": 2})
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["type"] == "unavailable"
        load.join(GRACE_SECONDS)
        assert len(outcomes) == NUM_REQUESTS
        errors = [f"{o.case.kind}: {o.error}" for o in outcomes if o.error]
        assert not errors, errors
        assert proc.wait(GRACE_SECONDS) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
