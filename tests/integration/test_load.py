"""A bounded load test on 127.0.0.1: 200 mixed requests, 48 at a time, against the live server.

Every route (TGI, OpenAI, few-shot; streaming and not) and many options (greedy, seeded
sampling, top-k / top-p, repetition penalty, beams, n > 1, stop strings). Zero errors, every
answer complete (tests/integration/mixed_requests.py checks each one), reproducible requests
equal to the same request sent alone, and afterwards the KV pool is entirely free.
"""

from __future__ import annotations

import httpx

from tests.integration.conftest import LiveServer, metric
from tests.integration.mixed_requests import Case, Outcome, build_cases, run_load

NUM_REQUESTS = 200
CONCURRENCY = 48
MAX_NEW_TOKENS = 16
NUM_REPLAYS = 24


def assert_pool_free(live: LiveServer) -> None:
    """No request left, every block back in the free list, refcounts consistent."""
    live.wait_idle()
    engine = live.state.engine.engine
    engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0


def failures(outcomes: list[Outcome]) -> list[str]:
    return [f"{o.case.kind}: {o.error}" for o in outcomes if o.error]


def replay_sample(outcomes: list[Outcome], limit: int) -> list[Outcome]:
    """Reproducible outcomes to run again alone: one per kind first, then the rest."""
    picked: dict[str, Outcome] = {}
    for o in outcomes:
        if o.case.deterministic and o.case.kind not in picked:
            picked[o.case.kind] = o
    return list(picked.values())[:limit]


def assert_same_alone(base_url: str, outcomes: list[Outcome]) -> None:
    """Each outcome's texts equal the same request sent with nothing else running."""
    for batched in outcomes:
        [alone] = run_load(base_url, [batched.case], 1)
        assert alone.error is None, alone.error
        assert alone.texts == batched.texts, (batched.case.kind, batched.case.body)


def test_mixed_load_completes_and_matches_requests_run_alone(live_server: LiveServer) -> None:
    url = live_server.base_url
    before = httpx.get(f"{url}/metrics").text
    cases = build_cases(NUM_REQUESTS, MAX_NEW_TOKENS, seed=8)
    kinds = {(c.path, c.stream) for c in cases}
    assert len(kinds) == 6  # every route, streaming and not (/generate_stream streams only)
    assert {c.name for c in cases} >= {"beams", "best-of-2", "n-2", "seeded", "greedy"}

    outcomes = run_load(url, cases, CONCURRENCY)
    assert not failures(outcomes), "\n".join(failures(outcomes)[:10])
    assert_pool_free(live_server)
    after = httpx.get(f"{url}/metrics").text
    for status in ("500", "503", "429"):
        assert metric(after, "kogpt_requests_total", status=status) == metric(
            before, "kogpt_requests_total", status=status
        ), status
    finished = metric(after, "kogpt_request_finish_total") - metric(
        before, "kogpt_request_finish_total"
    )
    assert finished == NUM_REQUESTS  # one engine request per HTTP request (one prompt each)
    for reason in ("error", "abort"):
        delta = metric(after, "kogpt_request_finish_total", finish_reason=reason) - metric(
            before, "kogpt_request_finish_total", finish_reason=reason
        )
        assert delta == 0, reason

    sample = replay_sample(outcomes, NUM_REPLAYS)
    assert len(sample) == NUM_REPLAYS
    assert_same_alone(url, sample)
    assert_pool_free(live_server)


def test_load_cases_are_reproducible_by_seed() -> None:
    """The mix is drawn from a seeded RNG: a failure names a case that can be re-sent."""
    first, again = build_cases(30, 8, seed=3), build_cases(30, 8, seed=3)
    assert first == again and first != build_cases(30, 8, seed=4)
    assert all(isinstance(c, Case) and c.max_new_tokens == 8 for c in first)
