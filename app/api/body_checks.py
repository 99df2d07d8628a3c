"""Checks on the raw request body that hold for every JSON route, run by the middleware on
the buffered body before the app parses it.

JSON may spell a lone UTF-16 surrogate ("\\ud800"); Python's json module decodes it into a
str that is no valid Unicode, which the tokenizer cannot encode (a TypeError, hence a 500,
deep inside a route or the engine). It is refused here once, for every field, as a 422 that
names the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.api.errors import APIError

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


def surrogate_error(field: str) -> APIError:
    return APIError(
        422,
        f"`{field}` contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
        "text must be valid Unicode",
        "validation",
        field,
    )
