"""How long the device computes each step's forward, and how long it waits between them.

Per forward (one per engine step):

- ``device_busy``: the forward on the device. On CUDA, CUDA events recorded around it (the
  device's own clock, so asynchronous launches do not hide work); elsewhere the forward runs
  synchronously and its wall time is the busy time.
- ``device_idle``: from the end of the previous forward to the start of this one on the
  device, counted only when requests were already running before the step (an empty
  engine waiting for traffic is not idleness the engine could remove). This is the host work
  between forwards that keeps the device waiting: sampling, stop checks, detokenization,
  the hand-off to HTTP, scheduling and this step's input building.
- ``host``: the host's wall time between the previous forward's return and this one's
  start, under the same condition. On CPU it equals ``device_idle``; on CUDA it also holds
  the time the host spends waiting for the device's results.

On CUDA a forward's events are read at the next step's start, when the previous step has
already synchronized (its sampled tokens reached the host), so measuring adds no sync.
Work outside the target model's forward (a draft model's mirror forward, class-B requests
run between steps) counts as idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepTiming:
    device_busy: float  # seconds
    device_idle: float | None  # None: no request was running before the step
    host: float | None


@dataclass
class _Pending:  # a CUDA forward whose events are not read yet
    start: torch.cuda.Event
    end: torch.cuda.Event
    previous_end: torch.cuda.Event | None
    host: float | None


class StepTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device  # events record on its current stream (the forward's)
        self.observers: list[Callable[[StepTiming], None]] = []
        self.busy_seconds = 0.0
        self.idle_seconds = 0.0
        self.num_forwards = 0
        self._continuing = False
        self._host_start = 0.0
        self._host_last_end: float | None = None
        self._event_start: torch.cuda.Event | None = None
        self._event_last_end: torch.cuda.Event | None = None
        self._pending: list[_Pending] = []

    @property
    def idle_ratio(self) -> float:
        """Share of measured device time spent idle between forwards (0 before any)."""
        total = self.busy_seconds + self.idle_seconds
        return self.idle_seconds / total if total > 0 else 0.0

    def stats(self) -> dict[str, float]:
        """Totals for the engine's stats (and /metrics)."""
        return {
            "device_busy_seconds": self.busy_seconds,
            "device_idle_seconds": self.idle_seconds,
            "device_idle_ratio": self.idle_ratio,
        }

    def begin_step(self, continuing: bool) -> None:
        """At the start of an engine step; ``continuing``: requests were running before it."""
        self._continuing = continuing
        self._read_events()

    def forward_started(self) -> None:
        self._host_start = time.perf_counter()
        if self.cuda:
            self._event_start = torch.cuda.Event(enable_timing=True)
            self._event_start.record(torch.cuda.current_stream(self.device))

    def forward_finished(self) -> None:
        now = time.perf_counter()
        counted = self._continuing and self._host_last_end is not None
        host = self._host_start - self._host_last_end if counted else None  # type: ignore[operator]
        self._host_last_end = now
        self._continuing = False  # a second forward in one step starts no new gap
        if not self.cuda:
            self._record(StepTiming(now - self._host_start, host, host))
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        assert self._event_start is not None
        previous = self._event_last_end if counted else None
        self._pending.append(_Pending(self._event_start, end, previous, host))
        self._event_last_end = end

    def _read_events(self) -> None:
        while self._pending and self._pending[0].end.query():
            p = self._pending.pop(0)
            busy = p.start.elapsed_time(p.end) / 1000.0
            idle = None if p.previous_end is None else p.previous_end.elapsed_time(p.start) / 1000.0
            self._record(StepTiming(busy, idle, p.host))

    def _record(self, timing: StepTiming) -> None:
        self.num_forwards += 1
        self.busy_seconds += timing.device_busy
        if timing.device_idle is not None:
            self.idle_seconds += timing.device_idle
        for observe in self.observers:
            observe(timing)
