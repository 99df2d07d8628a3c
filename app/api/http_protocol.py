"""uvicorn's h11 protocol with a header-read deadline (--header-read-timeout-seconds).

uvicorn bounds only the idle time between two requests of a kept-alive connection
(timeout_keep_alive); a client that connects and then sends its request line and headers
slowly, or nothing at all, holds its socket (and a slot of --max-connections) for ever. Here
a deadline starts when the connection opens and when a new request's first bytes arrive; it
ends once h11 has the whole header block. Past it the connection is closed (with a 408 when
part of a request had arrived). The body has its own deadline in the middleware.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    header_timeout: float = 10.0  # set per server by with_header_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_task: asyncio.TimerHandle | None = None
        self._partial = False
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still reading a request line and headers
            self._partial = self._partial or bool(data)
            if self._header_task is None:  # a kept-alive connection's next request began
                self._arm_header_deadline()
        else:
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle wait
        self._partial = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_task = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_task is not None:
            self._header_task.cancel()
            self._header_task = None

    def _headers_too_slow(self) -> None:
        self._header_task = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined request is still being answered
        if self._partial:  # h11 cannot answer a request it has not parsed: written raw
            body = json.dumps(
                {
                    "error": f"the request headers did not arrive within {self.header_timeout:g} "
                    "s (--header-read-timeout-seconds)",
                    "error_type": "timeout",
                }
            ).encode()
            head = (
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class for a server whose header deadline is `seconds`."""
    return type(
        "HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": seconds}
    )
