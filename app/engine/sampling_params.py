"""The engine's import point for a request's resolved options.

`SamplingParams` and the resolve step live in app/options (params.py, resolve.py), generated
from the option registry; the engine reads SamplingParams and never imports the HTTP side.
"""

from app.options.checks import ParamValidationError
from app.options.params import FIELD_NAMES, SamplingParams
from app.options.resolve import ACCEPTED_OPTIONS, resolve_sampling_params

__all__ = [
    "ACCEPTED_OPTIONS",
    "FIELD_NAMES",
    "ParamValidationError",
    "SamplingParams",
    "resolve_sampling_params",
]
