"""The request schema of every generate option (transformers 5.23 GenerationConfig names),
generated from the option registry (app/options/registry.py).

`GenerateOptions` declares each option once, so /docs lists them all and a typo is a 422 that
names it (extra="forbid"). Types and the registry's bounds are checked here; what each option
does (served, accepted and ignored, 422 with the reason) is the registry's status and lane,
applied by `app.options.routing.split_options`; the resolve step (app/options/resolve.py) does
the model-aware validation (lengths against n_positions, token ids against the vocabulary,
cross-field rules). A value of null means "omitted": the checkpoint's generation_config
default applies, exactly as in `model.generate`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from app.options.registry import OPTIONS_MODEL, names
from app.options.schema import option_fields
from app.options.wire_types import Grammar, TokenIds

__all__ = ["OPTION_NAMES", "GenerateOptions", "Grammar", "TokenIds"]


class _OptionsBase(BaseModel):
    # strict: a JSON string is never a number or a boolean ("1", "true": 422, as in TGI and
    # OpenAI), so the schema /docs shows is exactly the one enforced.
    model_config = ConfigDict(extra="forbid", strict=True)

    def engine_options(self, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """The options the caller set (null = omitted), for the resolve step."""
        return self.model_dump(exclude_none=True, exclude=set(exclude))


GenerateOptions = create_model(
    "GenerateOptions",
    __base__=_OptionsBase,
    __doc__="The generate options shared by /generate, /generate_stream, /few-shot and the "
    "OpenAI routes' extra fields.",
    __module__=__name__,
    **option_fields(names(model=OPTIONS_MODEL)),
)

OPTION_NAMES: frozenset[str] = frozenset(GenerateOptions.model_fields)
