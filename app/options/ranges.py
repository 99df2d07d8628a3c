"""`Range`: an option's numeric bounds, written once in the registry and read three ways:
the request schema's bounds (pydantic ge / gt / le / lt, hence /openapi.json), the range text
of docs/options.md, and the resolve step's check (a 422 message naming the field and range).

No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.options.checks import ParamValidationError, finite, is_int

_KINDS = ("ge", "gt", "le", "lt")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else repr(x)


@dataclass(frozen=True)
class Range:
    """Closed or open bounds on a number; None = unbounded on that side.

    `hint` follows the range in messages and docs (" (0 disables top-k)", " seconds").
    `schema`: the bounds the request schema also enforces (None: all of them). The rest are
    checked by the resolve step only, so their 422 names the field and range in the engine's
    words (e.g. top_n_tokens' upper bound, seed's range)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    hint: str = ""
    schema: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        assert not (self.ge is not None and self.gt is not None), "one lower bound"
        assert not (self.le is not None and self.lt is not None), "one upper bound"
        assert self.schema is None or set(self.schema) <= set(_KINDS), self.schema

    @property
    def lower(self) -> float | None:
        return self.ge if self.ge is not None else self.gt

    @property
    def upper(self) -> float | None:
        return self.le if self.le is not None else self.lt

    def contains(self, x: float) -> bool:
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )

    @property
    def text(self) -> str:
        """ ">= 0", "> 0", "(0, 1]", "[0, 5]" ... without the hint."""
        lo, hi = self.lower, self.upper
        if lo is not None and hi is not None:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            return f"in {left}{_num(lo)}, {_num(hi)}{right}"
        if lo is not None:
            return f"{'>=' if self.ge is not None else '>'} {_num(lo)}"
        if hi is not None:
            return f"{'<=' if self.le is not None else '<'} {_num(hi)}"
        return "any"

    @property
    def doc(self) -> str:
        """The range as docs/options.md shows it."""
        return self.text.removeprefix("in ") + self.hint

    def schema_kwargs(self) -> dict[str, Any]:
        """The pydantic Field bounds the request schema enforces."""
        kinds = _KINDS if self.schema is None else self.schema
        return {k: getattr(self, k) for k in kinds if getattr(self, k) is not None}

    def bounds(self) -> dict[str, Any]:
        """Every bound as pydantic Field keywords (for a wire field that maps onto the option)."""
        return {k: getattr(self, k) for k in _KINDS if getattr(self, k) is not None}

    def check_int(self, name: str, value: Any) -> int:
        """An integer within the range, or ParamValidationError naming `name` and the range."""
        if not is_int(value) or not self.contains(value):
            raise ParamValidationError(
                name, f"`{name}` must be an integer {self.text}{self.hint}, got {value!r}"
            )
        return int(value)

    def check_float(self, name: str, value: Any) -> float:
        """A finite number (ints accepted) within the range."""
        x = finite(name, value)
        if not self.contains(x):
            raise ParamValidationError(name, f"`{name}` must be {self.text}{self.hint}, got {x}")
        return x
