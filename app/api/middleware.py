"""One pure-ASGI middleware in front of every route (no BaseHTTPMiddleware: streams and
disconnects pass through untouched).

In order: request id (X-Request-ID, taken from the client or made up), API key check
(401, constant-time compare), body size limit (413, before the app reads anything) and a
body read deadline (408), a lone UTF-16 surrogate in the JSON (422, body_checks.py), a
/v1/completions prompt list longer than --max-request-sequences (a body over 64 KiB is
scanned in a worker thread before anything parses it), then the app; afterwards the HTTP
metrics (count by endpoint and status, latency; labelled with the full model the route
selected, `note_request_model`, else the default model) and one structured access-log line.
Errors are rendered in the route's error shape (errors.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.body_checks import (
    LARGE_BODY_BYTES,
    lone_surrogate_field,
    surrogate_error,
    too_many_prompts,
)
from app.api.errors import APIError, error_bytes, wire_status

logger = logging.getLogger("kogpt.access")

PUBLIC_ALWAYS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PROBES = frozenset({"/health", "/ready", "/metrics"})
# The playground page and its assets are public static files (GET only: POST / is the API).
PUBLIC_PAGE_PREFIX = "/playground"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# The HTTP request being served: its scope's state (what `request.state` reads and writes),
# so code that serves it without the Request object can note what the metrics record. Tasks
# a route starts copy the context, hence share the same dict.
_REQUEST_STATE: ContextVar[dict[str, Any] | None] = ContextVar("kogpt_request_state", default=None)


def note_request_model(name: str) -> None:
    """Label the HTTP metrics of the request being served with the full model `name` (its
    reported name; an adapter's request: its base model's). Outside a request: nothing."""
    state = _REQUEST_STATE.get()
    if state is not None:
        state["model"] = name


class ApiMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        public_probes: bool,
        metrics: Any = None,
        body_read_timeout: float | None = None,
        max_request_sequences: int | None = None,
    ) -> None:
        self.app = app
        self.max_request_sequences = max_request_sequences
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout = body_read_timeout
        self.public = PUBLIC_ALWAYS | (PUBLIC_PROBES if public_probes else frozenset())
        self.metrics = metrics  # set later when the metrics object is created in the lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope_state = scope.setdefault("state", {})
        scope_state["request_id"] = request_id
        served = _REQUEST_STATE.set(scope_state)
        path: str = scope["path"]
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            rejection = None if _is_public_page(scope) else self._check_auth(path, headers)
            if rejection is None:
                rejection, receive = await self._limit_body(headers, receive, path)
            if rejection is not None:
                await self._reject(rejection, path, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            _REQUEST_STATE.reset(served)
            self._record(scope, request_id, status["code"], time.perf_counter() - start)

    # -- checks -----------------------------------------------------------------------------
    def _check_auth(self, path: str, headers: dict[str, str]) -> APIError | None:
        if self.api_key is None or path in self.public:
            return None
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if given and hmac.compare_digest(given, self.api_key):
            return None
        message = "missing API key" if not given else "invalid API key"
        return APIError(
            401,
            f"{message}: send `Authorization: Bearer <key>`",
            "authentication",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def _limit_body(
        self, headers: dict[str, str], receive: Receive, path: str
    ) -> tuple[APIError | None, Receive]:
        """Read the whole body (up to the limit) before the app runs, then replay it."""
        limit = self.max_body_bytes
        too_large = APIError(
            413,
            f"the request body exceeds {limit} bytes (--max-body-bytes)",
            "payload_too_large",
        )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return too_large, receive
        chunks: list[bytes] = []
        size = 0
        deadline = (
            None if self.body_read_timeout is None else time.monotonic() + self.body_read_timeout
        )
        while True:
            try:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                return self._too_slow(), receive
            if message["type"] != "http.request":  # disconnected while sending the body
                return None, _replay([message], receive)
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return too_large, receive
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = b"".join(chunks)
        if len(whole) > LARGE_BODY_BYTES:  # JSON decoding takes long: not on the event loop
            error = await asyncio.to_thread(self._check_large_body, whole, path)
        else:
            error = self._check_body(whole)
        if error is not None:
            return error, receive
        replay = {"type": "http.request", "body": whole, "more_body": False}
        return None, _replay([replay], receive)

    @staticmethod
    def _check_body(body: bytes) -> APIError | None:
        field = lone_surrogate_field(body)
        if field is not None:  # text no tokenizer can encode: 422 for every route at once
            return surrogate_error(field)
        return None

    def _check_large_body(self, body: bytes, path: str) -> APIError | None:
        """A large body's checks, in a worker thread: a /v1/completions prompt list refused
        by its length before anything parses it, then the surrogate check."""
        if self.max_request_sequences is not None and path.rstrip("/") == "/v1/completions":
            error = too_many_prompts(body, self.max_request_sequences)
            if error is not None:
                return error
        return self._check_body(body)

    def _too_slow(self) -> APIError:
        return APIError(
            408,
            f"the request body did not arrive within {self.body_read_timeout:g} s "
            "(--body-read-timeout-seconds)",
            "timeout",
        )

    @staticmethod
    async def _reject(err: APIError, path: str, send: Send) -> None:
        body = error_bytes(err, path)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
        if err.status_code in (408, 413):  # the rest of the body is never read
            headers.append((b"connection", b"close"))
        status = wire_status(err, path)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # -- after ------------------------------------------------------------------------------
    def _record(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        if self.metrics is not None:
            model = scope.get("state", {}).get("model")
            self.metrics.observe_http(endpoint, status, seconds, model=model)
        client = scope.get("client")
        record = {
            "event": "http_request",
            "request_id": request_id,
            "method": scope.get("method"),
            "path": scope["path"],
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        logger.info(json.dumps(record))


def _is_public_page(scope: Scope) -> bool:
    path: str = scope["path"]
    page = path == "/" or path == PUBLIC_PAGE_PREFIX or path.startswith(PUBLIC_PAGE_PREFIX + "/")
    return page and scope.get("method") in ("GET", "HEAD")


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
