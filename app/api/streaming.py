"""SSE framing, and the guards that end a request when its client leaves or shutdown cuts it.

`SSEResponse` streams `data: <json>` events. While it streams it watches the connection:
when the client disconnects (or the shutdown grace period ends) the event generator is
cancelled and closed at once, which aborts the engine request and frees its KV blocks.
An APIError raised by the generator after the stream started becomes a final error event
in the route's error shape (TGI or OpenAI, see errors.py).

`guarded` gives non-streaming routes the same: the generation is cancelled as soon as the
client disconnects, instead of running to completion for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.errors import APIError, ClientDisconnected, error_json

logger = logging.getLogger("kogpt.api")

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"
# Line separators that some SSE clients split on even inside a JSON string.
_SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def sse_event(payload: Any) -> bytes:
    """One `data:` event: compact UTF-8 JSON on a single line."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in _SEPARATORS.items():
        if raw in text:
            text = text.replace(raw, escaped)
    return b"data: " + text.encode() + b"\n\n"


def sse_event_schema(event_ref: str, error_ref: str, *, done: bool) -> dict[str, Any]:
    """OpenAPI schema of one server-sent event (as OpenAPI before 3.2 reads a text/event-stream
    schema): `data` is a JSON string holding an event or a final error event, or (OpenAI
    streams, `done`) the literal `[DONE]`. Validators that know contentSchema check the JSON."""
    payload = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": event_ref}, {"$ref": error_ref}]},
    }
    data = {"anyOf": [{"const": "[DONE]"}, payload]} if done else payload
    return {
        "type": "object",
        "properties": {"data": data, "event": {"type": "string"}},
        "required": ["data"],
    }


def shutdown_error() -> APIError:
    return APIError(
        503,
        "the server is shutting down: the request was cut at the end of the grace period",
        "unavailable",
    )


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        *,
        cutoff: threading.Event | None = None,
        headers: dict[str, str] | None = None,
        ping_seconds: float = 15.0,
    ) -> None:
        base = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, headers={**base, **(headers or {})})
        self.events = events
        self.cutoff = cutoff
        self.ping_seconds = ping_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        lock = anyio.Lock()
        outcome = {"disconnected": False, "cut": False}

        async def emit(chunk: bytes) -> None:
            async with lock:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    final = None
                    try:
                        async for chunk in self.events:
                            await emit(chunk)
                    except APIError as err:
                        final = sse_event(error_json(err, path))
                    except OSError:  # the client is gone
                        outcome["disconnected"] = True
                    except Exception:
                        logger.exception("stream failed on %s", path)
                        err = APIError(500, "internal error", "internal")
                        final = sse_event(error_json(err, path))
                    if final is not None:
                        await emit(final)
                    group.cancel_scope.cancel()

                async def ping() -> None:
                    while True:
                        await anyio.sleep(self.ping_seconds)
                        await emit(PING)

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    outcome["disconnected"] = True
                    group.cancel_scope.cancel()

                async def watch_cutoff(event: threading.Event) -> None:
                    await wait_flag(event)
                    outcome["cut"] = True
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(ping)
                group.start_soon(watch_disconnect)
                if self.cutoff is not None:
                    group.start_soon(watch_cutoff, self.cutoff)
        except Exception:  # a send failed: the client is gone
            outcome["disconnected"] = True
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                # Closing the generator runs its cleanup now: the engine request is aborted.
                await self.events.aclose()  # type: ignore[attr-defined]
        if outcome["disconnected"]:
            return
        with contextlib.suppress(OSError):
            if outcome["cut"]:
                await emit(sse_event(error_json(shutdown_error(), path)))
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def wait_flag(flag: threading.Event, interval: float = 0.1) -> None:
    """Wait for a flag that another thread or event loop may set."""
    while not flag.is_set():
        await asyncio.sleep(interval)


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def guarded(request: Request, awaitable: Awaitable[T], cutoff: threading.Event) -> T:
    """Run a non-streaming generation; cancel it when the client leaves or shutdown cuts it."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(wait_disconnect(request.receive))
    cut = asyncio.ensure_future(wait_flag(cutoff))
    try:
        await asyncio.wait({task, gone, cut}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if cut.done():
            raise shutdown_error()
        raise ClientDisconnected()
    finally:
        for helper in (gone, cut, task):
            if not helper.done():
                helper.cancel()
