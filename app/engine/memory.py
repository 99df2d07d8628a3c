"""Giving freed heap memory back to the OS once the engine is idle.

A burst of maximal requests (a thousand sequences, contrastive search's KV copies, large
bodies decoded in worker threads) leaves glibc's arenas holding freed pages: RSS stayed 14%
above its level before the burst with every request finished and the KV pool free.
`malloc_trim(0)` returns the free pages of every arena. It runs on the engine thread when
the engine has gone idle after work, at most once per `min_interval` seconds, so steady
traffic never pays for it. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

logger = logging.getLogger("kogpt.engine")


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


class IdleTrimmer:
    """Call `busy()` after work and `idle()` while there is none: the first idle call at
    least `min_interval` s after the last trim trims."""

    def __init__(self, min_interval: float = 5.0) -> None:
        self.min_interval = min_interval
        self._trim = _load_malloc_trim()
        self._worked = False
        self._last = float("-inf")
        self.trims = 0

    def busy(self) -> None:
        self._worked = True

    def idle(self) -> None:
        now = time.monotonic()
        if not self._worked or self._trim is None or now - self._last < self.min_interval:
            return
        self._worked = False
        self._last = now
        self._trim(0)
        self.trims += 1
        logger.debug("idle: returned free heap memory to the OS (malloc_trim)")
