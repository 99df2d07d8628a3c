"""An option's registry row turned into behaviour: passed to the engine, dropped, refused with
a 422, or routed to the exact lane or the class-B methods (no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.options.checks import ParamValidationError
from app.options.registry import (
    API,
    CLASS_B,
    ENGINE,
    EXACT_LANE,
    IGNORED,
    NEEDS_DRAFT_MODEL,
    NO_DRAFT,
    NOT_YET,
    OPTIONS,
    SERVED,
    Option,
)


@dataclass
class OptionSplit:
    """A request's options routed by the registry (app/options/registry.py)."""

    engine: dict[str, Any]  # for resolve_sampling_params (negative_prompt still as text)
    ignored: list[str]  # accepted, no effect on output (classes D, use_cache, bos_token_id)
    exact: list[str]  # diagnostic outputs asked for: the exact lane (class C)
    class_b: dict[str, Any] = field(default_factory=dict)  # class-B methods' options


def _is_neutral(value: Any, opt: Option) -> bool:
    return any(type(value) is type(v) and value == v for v in opt.neutral) or (
        isinstance(value, float) and any(value == v for v in opt.neutral)
    )


def _refusal(opt: Option, reason: str | None = None) -> str:
    hint = f" (or set it to {opt.neutral[0]!r})" if opt.neutral else ""
    if opt.status == NOT_YET:
        return f"`{opt.name}` is not supported yet ({opt.note}); omit it{hint}"
    return f"`{opt.name}`: {reason or opt.note}; omit it{hint}"


def split_options(options: Mapping[str, Any], draft_model: bool = False) -> OptionSplit:
    """The one place where an option's status and lane become behaviour.

    Served by the engine (and unknown names, which resolve_sampling_params rejects by name):
    passed on. Accepted-ignored: dropped. Rejected / not yet: a ParamValidationError naming
    the field and why, unless the value is null or neutral (the HF default: as omitted).
    Served by the HTTP layer: `negative_prompt` passed on (the resolve step tokenizes it), the
    output flags dropped (the schemas turned them into `details`). Exact-lane outputs: listed.
    Class-B options (contrastive, group beam, DoLa, constraints): collected for resolve_class_b.
    """
    split = OptionSplit({}, [], [])
    for name, value in options.items():
        opt = OPTIONS.get(name)
        needs_draft = name in NEEDS_DRAFT_MODEL and not draft_model and value is not None
        if opt is not None and needs_draft and not _is_neutral(value, opt):
            raise ParamValidationError(name, _refusal(opt, NO_DRAFT))  # no draft model
        if opt is None or (opt.status == SERVED and opt.lane == ENGINE):
            split.engine[name] = value
        elif value is None:
            continue
        elif opt.status == SERVED:
            if opt.lane == EXACT_LANE and value:
                split.exact.append(name)
            elif opt.lane == CLASS_B:
                split.class_b[name] = value
            elif opt.lane == API and name == "negative_prompt":
                split.engine[name] = value
        elif opt.status == IGNORED:
            split.ignored.append(name)
        elif not _is_neutral(value, opt):
            raise ParamValidationError(name, _refusal(opt))
    return split


def exact_outputs(options: Mapping[str, Any]) -> list[str]:
    """The diagnostic outputs (output_attentions, output_hidden_states) a request asks for."""
    return [n for n, o in OPTIONS.items() if o.lane == EXACT_LANE and options.get(n)]
