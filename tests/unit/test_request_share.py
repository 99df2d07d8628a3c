"""RequestShares (app/api/serving.py): one HTTP request's engine requests enter the engine
only while its share has room: --max-request-share while other requests are served (and a
hold time after), twice that alone, its first one always. Counted, never timed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from app.api import serving
from app.api.serving import RequestShares, request_share
from tests.fake_clock import fake_monotonic


def server(share: int = 2, seats: int = 16) -> Any:
    settings = SimpleNamespace(max_request_share=share, max_num_seqs=seats)
    return SimpleNamespace(settings=settings, request_shares=None)


async def run_prompts(
    state: Any, request_id: str, prompts: int, sequences: int, peak: list[int], gate: Any
) -> None:
    """`prompts` engine requests of one HTTP request; `peak` records the most in the engine."""
    inside = [0]

    async def one() -> None:
        async with request_share(state, request_id, sequences):
            inside[0] += sequences
            peak.append(inside[0])
            await gate()
            inside[0] -= sequences

    await asyncio.gather(*(one() for _ in range(prompts)))


def test_alone_a_request_has_twice_the_share() -> None:
    state = server(share=2, seats=16)
    peak: list[int] = []

    async def main() -> None:
        await run_prompts(state, "big", 12, 1, peak, lambda: asyncio.sleep(0))

    asyncio.run(main())
    assert max(peak) == 4 and len(peak) == 12
    assert not state.request_shares.active  # nothing left behind


def test_with_another_request_the_share_shrinks(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    fake_monotonic(monkeypatch, serving, clock)
    state = server(share=2, seats=16)
    big: list[int] = []
    small: list[int] = []

    async def two_yields() -> None:
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    async def main() -> None:
        canary = asyncio.ensure_future(run_prompts(state, "canary", 1, 1, small, two_yields))
        await asyncio.sleep(0)  # the canary is in the engine first
        await run_prompts(state, "big", 20, 1, big, lambda: asyncio.sleep(0))
        await canary

    asyncio.run(main())
    assert small == [1]
    assert max(big) == 2  # contended: --max-request-share; the clock never passed the hold


def test_a_prompt_larger_than_the_share_still_runs() -> None:
    state = server(share=2, seats=8)
    peak: list[int] = []

    async def main() -> None:
        await run_prompts(state, "beams", 3, 5, peak, lambda: asyncio.sleep(0))

    asyncio.run(main())
    assert peak == [5, 5, 5]  # one at a time, each alone of its request


def test_the_hold_ends_contention(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    fake_monotonic(monkeypatch, serving, clock)
    shares = RequestShares()
    shares.active = {"a": object(), "b": object()}  # type: ignore[dict-item]
    assert shares.cap(alone=64, contended=8) == 8
    shares.active = {"a": object()}  # type: ignore[dict-item]
    clock[0] += RequestShares.HOLD_SECONDS / 2
    assert shares.cap(alone=64, contended=8) == 8
    clock[0] += RequestShares.HOLD_SECONDS
    assert shares.cap(alone=64, contended=8) == 64


def test_a_cancelled_waiter_takes_nothing_and_blocks_no_one() -> None:
    state = server(share=1, seats=2)  # alone: 2 sequences

    async def main() -> None:
        gate = asyncio.Event()
        inside: list[str] = []

        async def job(name: str) -> None:
            async with request_share(state, "r", 2):
                inside.append(name)
                await gate.wait()

        first = asyncio.ensure_future(job("first"))
        waiting = asyncio.ensure_future(job("waiting"))
        last = asyncio.ensure_future(job("last"))
        await asyncio.sleep(0)
        assert inside == ["first"]
        waiting.cancel()
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, last)
        assert inside == ["first", "last"] and waiting.cancelled()
        assert not state.request_shares.active

    asyncio.run(main())
