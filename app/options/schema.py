"""The request schema's fields, generated from the registry (pydantic, no torch).

`option_fields(names)` gives the (annotation, Field) pairs that pydantic's `create_model`
takes; the HTTP models (app/api/options.py, app/api/protocol/tgi.py) are built from them, so
each field's type, bounds, default and description come from app/options/registry.py.
"""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import Field

from app.options.registry import OPTIONS


def allows_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def option_field(name: str) -> tuple[Any, Any]:
    """(annotation, FieldInfo) of one option as the request schema declares it."""
    opt = OPTIONS[name]
    annotation = opt.annotation
    if opt.wire_default is None and not allows_none(annotation):
        annotation = annotation | None
    kwargs: dict[str, Any] = opt.range.schema_kwargs() if opt.range is not None else {}
    if opt.finite:
        kwargs["allow_inf_nan"] = False
    return annotation, Field(default=opt.wire_default, description=opt.description, **kwargs)


def option_fields(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: option_field(name) for name in names}
