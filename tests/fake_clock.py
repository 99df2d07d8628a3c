"""A fake `time.monotonic` for one module under test.

Patching `time.monotonic` itself (`monkeypatch.setattr(module.time, "monotonic", ...)`)
changes it for the whole process: a live test server's event loop, in another thread,
then schedules its timers on the fake clock and, the patch undone, sleeps until the real
clock reaches them (its shutdown waited for 30 s). Only the module's own `time` name is
replaced here; every other attribute is the real module's.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import pytest


class _ModuleTime:
    def __init__(self, clock: list[float]) -> None:
        self._clock = clock

    def monotonic(self) -> float:
        return self._clock[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def fake_monotonic(monkeypatch: pytest.MonkeyPatch, module: ModuleType, clock: list[float]) -> None:
    """`module`'s `time.monotonic()` reads `clock[0]` for the rest of the test."""
    monkeypatch.setattr(module, "time", _ModuleTime(clock))
