"""An option's row in the option table (app/api/option_table.py) turned into behaviour:
passed to the engine, dropped, refused with a 422, or routed to the exact lane or the
class-B methods."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.api.option_table import (
    IGNORED,
    NEEDS_DRAFT_MODEL,
    NO_DRAFT,
    NOT_YET,
    OPTION_TABLE,
    SERVED,
    OptionSpec,
)
from app.engine.sampling_params import ParamValidationError


@dataclass
class OptionSplit:
    """A request's options routed by the option table (app/api/option_table.py)."""

    engine: dict[str, Any]  # for resolve_sampling_params (negative_prompt still as text)
    ignored: list[str]  # accepted, no effect on output (classes D, use_cache, prompt lookup)
    exact: list[str]  # diagnostic outputs asked for: the exact lane (class C)
    class_b: dict[str, Any] = field(default_factory=dict)  # class-B methods' options


def _is_neutral(value: Any, spec: OptionSpec) -> bool:
    return any(type(value) is type(v) and value == v for v in spec.neutral) or (
        isinstance(value, float) and any(value == v for v in spec.neutral)
    )


def _refusal(spec: OptionSpec, reason: str | None = None) -> str:
    hint = f" (or set it to {spec.neutral[0]!r})" if spec.neutral else ""
    if spec.status == NOT_YET:
        return f"`{spec.name}` is not supported yet ({spec.note}); omit it{hint}"
    return f"`{spec.name}`: {reason or spec.note}; omit it{hint}"


def split_options(options: Mapping[str, Any], draft_model: bool = False) -> OptionSplit:
    """The one place where an option's table status becomes behaviour.

    Served by the engine (and unknown names, which resolve_sampling_params rejects by name):
    passed on. Accepted-ignored: dropped. Rejected / not yet: a ParamValidationError naming
    the field and why, unless the value is null or neutral (the HF default: as omitted).
    Served by the HTTP layer: `negative_prompt` passed on (build_params tokenizes it), the
    output flags dropped (the schemas turned them into `details`). Exact-lane outputs: listed.
    Class-B options (contrastive, group beam, DoLa, constraints): collected for resolve_class_b.
    """
    split = OptionSplit({}, [], [])
    for name, value in options.items():
        spec = OPTION_TABLE.get(name)
        needs_draft = name in NEEDS_DRAFT_MODEL and not draft_model and value is not None
        if needs_draft and not _is_neutral(value, spec):  # assisted decoding, no draft model
            raise ParamValidationError(name, _refusal(spec, NO_DRAFT))
        if spec is None or (spec.status == SERVED and spec.via == "engine"):
            split.engine[name] = value
        elif value is None:
            continue
        elif spec.status == SERVED:
            if spec.via == "exact-lane" and value:
                split.exact.append(name)
            elif spec.via == "class-b":
                split.class_b[name] = value
            elif name == "negative_prompt":
                split.engine[name] = value
        elif spec.status == IGNORED:
            split.ignored.append(name)
        elif not _is_neutral(value, spec):
            raise ParamValidationError(name, _refusal(spec))
    return split


def exact_outputs(options: Mapping[str, Any]) -> list[str]:
    """The diagnostic outputs (output_attentions, output_hidden_states) a request asks for."""
    return [n for n in OPTION_TABLE if OPTION_TABLE[n].via == "exact-lane" and options.get(n)]
