"""Primitive checks for request options; each failure names the field and the allowed range.

No torch import. `ParamValidationError` is what every resolve stage raises; the HTTP side
maps it to a 422 (app/api/errors.py).
"""

from __future__ import annotations

import math
from typing import Any


class ParamValidationError(ValueError):
    """A request option is out of range; `field` names it, the message says the allowed range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def renamed(self, alias: str) -> ParamValidationError:
        """The same error, naming the field as the caller named it."""
        message = self.message.replace(f"`{self.field}`", f"`{alias}`")
        if alias not in message:
            message = f"`{alias}`: {message}"
        return ParamValidationError(alias, message)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_(name: str, value: Any, lo: int, what: str) -> int:
    if not is_int(value) or value < lo:
        raise ParamValidationError(name, f"`{name}` must be an integer {what}, got {value!r}")
    return int(value)


def finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamValidationError(name, f"`{name}` must be a finite number, got {value!r}")
    return float(value)


def bool_(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParamValidationError(name, f"`{name}` must be true or false, got {value!r}")
    return value
