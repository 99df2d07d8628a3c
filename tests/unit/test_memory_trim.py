"""IdleTrimmer (app/engine/memory.py): freed heap goes back to the OS once the engine is idle
after work, never while it works, never twice in a row without work, at most so often."""

from __future__ import annotations

import pytest

from app.engine import memory
from app.engine.memory import IdleTrimmer
from tests.fake_clock import fake_monotonic


def counting(trimmer: IdleTrimmer) -> list[int]:
    calls: list[int] = []
    trimmer._trim = lambda pad: calls.append(pad) or 1  # type: ignore[func-returns-value]
    return calls


def test_trims_once_per_idle_period_after_work() -> None:
    trimmer = IdleTrimmer(min_interval=0.0)
    calls = counting(trimmer)
    trimmer.idle()  # nothing ran: nothing to give back
    trimmer.busy()
    trimmer.busy()
    trimmer.idle()
    trimmer.idle()
    assert calls == [0] and trimmer.trims == 1
    trimmer.busy()
    trimmer.idle()
    assert trimmer.trims == 2


def test_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    fake_monotonic(monkeypatch, memory, clock)
    trimmer = IdleTrimmer(min_interval=5.0)
    calls = counting(trimmer)
    trimmer.busy()
    trimmer.idle()
    trimmer.busy()
    clock[0] += 1.0
    trimmer.idle()  # too soon: the work is remembered...
    assert len(calls) == 1
    clock[0] += 5.0
    trimmer.idle()  # ...and trimmed once the interval has passed
    assert len(calls) == 2


def test_glibc_is_found_here() -> None:
    assert memory._load_malloc_trim() is not None  # the servers' platform (Debian, glibc)
