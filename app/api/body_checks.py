"""Checks on the raw request body that hold for every JSON route, run by the middleware on
the buffered body before the app parses it.

JSON may spell a lone UTF-16 surrogate ("\\ud800"); Python's json module decodes it into a
str that is no valid Unicode, which the tokenizer cannot encode (a TypeError, hence a 500,
deep inside a route or the engine). It is refused here once, for every field, as a 422 that
names the field.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from app.api.errors import APIError

# Bodies past this size are decoded and checked in a worker thread, not on the event loop.
LARGE_BODY_BYTES = 64 * 1024

# A \uD800-\uDFFF escape; only then can the decoded body hold a surrogate (raw surrogate
# bytes are invalid UTF-8, which the JSON parser already refuses).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _is_valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")  # a decoded surrogate pair is one code point: only lone ones fail
    except UnicodeEncodeError:
        return False
    return True


def lone_surrogate_field(body: bytes) -> str | None:
    """Dotted path of the first key or string value holding a lone surrogate, else None."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the app's parser answers with its own 422
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:  # iterative: the body may nest as deep as the parser allows
        value, path = stack.pop()
        if isinstance(value, str) and not _is_valid_text(value):
            return path or "body"
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else key
                if not _is_valid_text(key):
                    return path or "body"
                stack.append((item, child))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value))
    return None


# What a scan of JSON's structure needs: escapes, quotes and punctuation (one short match at
# a time, so a long string never holds the GIL in one call).
_JSON_MARK = re.compile(rb'\\.|["\[\]{},:]')


def prompt_list_length(body: bytes, stop_after: int) -> int | None:
    """How many prompts the top-level `prompt` list holds (counting stops past
    `stop_after`), from the raw body; None when it holds none (a string, one prompt of token
    ids, no such key, no JSON object). A lazy scan in Python, not json.loads: run in a worker
    thread it lets the event loop take the GIL between matches (json.loads of 900 KB of
    one-token lists holds it for a quarter of a second and more)."""
    depth = 0
    in_string = False
    string_start = 0
    key = b""
    expect_key = False
    count: int | None = None  # elements of the prompt list seen so far
    last_end = 0
    for match in _JSON_MARK.finditer(body):
        mark = match.group()
        if in_string:
            if mark == b'"':
                in_string = False
                if depth == 1 and expect_key:
                    key = body[string_start : match.start()]
            continue  # an escape, or punctuation inside the string
        if mark[:1] == b"\\":
            return None  # not JSON
        first_element = count == 0 and depth == 2
        if first_element and mark in (b",", b"]"):
            literal = body[last_end : match.start()].strip()
            if literal[:1] in b"-0123456789" and literal:
                return None  # a number first: one prompt of token ids
            count = count or (1 if literal else 0)  # true / false / null
        last_end = match.end()
        if mark == b'"':
            in_string, string_start = True, match.end()
            if first_element:
                count = 1  # the first prompt (a string)
        elif mark in (b"{", b"["):
            if first_element:
                count = 1  # the first prompt (a list or an object)
            depth += 1
            expect_key = mark == b"{" and depth == 1
            if depth == 2 and key == b"prompt" and mark == b"[":
                count = 0
        elif mark in (b"}", b"]"):
            depth -= 1
            if count is not None and depth == 1:
                return count or None
        elif mark == b",":
            if depth == 1:
                expect_key = True
            elif count is not None and depth == 2:
                count += 1
                if count > stop_after:
                    return count
        else:  # ":"
            expect_key = False
    return None


def too_many_prompts(body: bytes, max_request_sequences: int) -> APIError | None:
    """A `prompt` list of more prompts than one request may run (each runs at least one
    sequence): refused from the raw body, before the route parses, validates or encodes it
    (150,000 one-token prompts took the event loop for seconds in parsing and validation)."""
    count = prompt_list_length(body, max_request_sequences)
    if count is None or count <= max_request_sequences:
        return None
    return APIError(
        422,
        f"`prompt` lists more than {max_request_sequences} prompts; at most "
        f"{max_request_sequences} sequences per request (--max-request-sequences): send "
        "fewer prompts or sequences",
        "validation",
        "prompt",
    )


def surrogate_error(field: str) -> APIError:
    return APIError(
        422,
        f"`{field}` contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
        "text must be valid Unicode",
        "validation",
        field,
    )


_UNDECODED = object()  # not JSON: FastAPI's own parse reports it as it does


def decode_and_validate(body: bytes, field: Any) -> Any:
    """The JSON body validated as the route's body model (FastAPI's own ModelField.validate,
    with its defaults), or the decoded body when it does not validate (FastAPI then reports
    the errors as it does), or _UNDECODED when it is not JSON."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return _UNDECODED
    value, errors = field.validate(data, {}, loc=("body",))
    return data if errors else value


class OffLoopBodyRoute(APIRoute):
    """A route that decodes and validates a large JSON body (over LARGE_BODY_BYTES) in a
    worker thread. FastAPI would json.loads and validate it on the event loop: 1,024 prompts
    of 220 token ids (878 KB) held /health for up to 0.3 s. Its own parse then finds the
    decoded body (Starlette caches it on the request) and its validation an instance of the
    body model, which pydantic passes through without validating again."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        if field is None:  # no body model: nothing to parse
            return handler

        async def route_handler(request: Request) -> Response:
            body = await request.body()
            json_type = "json" in request.headers.get("content-type", "application/json")
            if len(body) > LARGE_BODY_BYTES and json_type:
                decoded = await asyncio.to_thread(decode_and_validate, body, field)
                if decoded is not _UNDECODED:
                    request._json = decoded  # what Request.json() returns from now on
            return await handler(request)

        return route_handler
