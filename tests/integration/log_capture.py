"""Capture the server's log records in tests: the live servers run in this process (threads),
so a handler on the right loggers sees everything they log."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

# The app's loggers (kogpt.*) propagate to the root; uvicorn's stop at "uvicorn".
SERVER_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
CLIENT_LOGGERS = ("httpx", "httpcore", "hpack", "openai")  # the tests' own HTTP clients


class Records(logging.Handler):
    """Every record the server logs at `level` or above (client libraries' records excluded)."""

    def __init__(self, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(CLIENT_LOGGERS):
            self.records.append(record)

    def errors(self) -> list[str]:
        """ERROR and above, and anything logged with a traceback."""
        return [
            f"{r.name}: {r.getMessage()}"
            for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info is not None
        ]

    def text(self) -> str:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "\n".join(formatter.format(r) for r in self.records)


@contextmanager
def server_logs(level: int = logging.DEBUG) -> Iterator[Records]:
    """Records from every server logger at `level` and above (the loggers opened to it)."""
    handler = Records(level)
    loggers = [logging.getLogger(name) for name in SERVER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > level:  # under pytest the root is at WARNING
            logger.setLevel(level)
    try:
        yield handler
    finally:
        for logger, before in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(before)
