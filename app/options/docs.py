"""docs/options.md, generated from the option registry (app/options/registry.py):

python -m app.options.docs --markdown > docs/options.md
"""

from __future__ import annotations

import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

from app.engine.transformers_version import MATCHED_TRANSFORMERS
from app.options.registry import OPTIONS, Option


def type_text(annotation: Any) -> str:
    """A wire annotation as docs show it: `int | list[int]`, `bool | "never"` (None left out)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(a) for a in get_args(annotation) if a is not type(None))
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join("Any" if a is Any else type_text(a) for a in get_args(annotation))
        return f"{origin.__name__}[{args}]"
    return "Any" if annotation is Any else annotation.__name__


def range_text(opt: Option) -> str:
    if type_text(opt.annotation) == "bool" and opt.rules not in ("any", "neutral only"):
        return "; ".join(["true, false", *([opt.rules] if opt.rules else [])])
    return opt.range_text


def markdown() -> str:
    lines = [
        "# Generate options",
        "",
        "Generated from the option registry `app/options/registry.py` by "
        "`python -m app.options.docs --markdown > docs/options.md`; do not edit by hand.",
        f"Every option behaves as `model.generate` does in transformers {MATCHED_TRANSFORMERS}, "
        "the locked release (`requirements/*.lock`; `GET /info` reports it as "
        "`generate_matches_transformers`).",
        "Classes as in the generate-options contract (A in the batched engine, B served one "
        "request at a time between batch steps, "
        "C exact slow lane, D engine-owned, E not applicable, F HTTP forms of Python-only "
        "arguments, API the server's own). Status: served, accepted-ignored (no effect on "
        "output), rejected-422, not-yet (422 until served). Rejected and not-yet options "
        "are accepted at their neutral value. Default: `checkpoint, else X` means the "
        "checkpoint's generation_config value when it sets one, else X (transformers' global "
        "default), as in `model.generate`. The tests that cover each option are listed in "
        "`tests/unit/option_coverage.py`. See docs/api.md.",
        "",
        "| option | class | type | range | default | status | via | neutral | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in OPTIONS.values():
        neutral = ", ".join(repr(v) for v in o.neutral) if o.neutral else "-"
        kind = o.type_text or type_text(o.annotation)
        cells = [f"`{o.name}`", o.cls, f"`{kind}`", range_text(o), o.default_doc, o.status,
                 o.lane, neutral, o.note or "-"]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m app.options.docs --markdown > docs/options.md")
    sys.stdout.write(markdown())
