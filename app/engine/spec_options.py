"""Validation of the speculative-decoding options (no torch). None of them changes the output
(drafts are verified against plain decoding, spec_decode.py); they only change the speed.

Prompt lookup: prompt_lookup_num_tokens, max_matching_ngram_size. Draft model (class E,
served when the server has --draft-model; the HTTP layer refuses them otherwise):
num_assistant_tokens, num_assistant_tokens_schedule, assistant_confidence_threshold, with
transformers' defaults (20, "constant", 0.4), and options accepted with no effect here:
assistant_lookbehind / target_lookbehind (they align two different tokenizers; the draft
shares the target's), assistant_early_exit and speculation_type (the configured draft model
drafts), is_assistant (transformers' internal flag).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.engine.validation import ParamValidationError
from app.engine.validation import bool_ as _bool
from app.engine.validation import finite as _finite
from app.engine.validation import int_ as _int

# GenerationConfig's fallback when max_matching_ngram_size is unset (generation/utils.py).
DEFAULT_MAX_MATCHING_NGRAM_SIZE = 2
# GenerationConfig._get_default_generation_params() for the draft-model options.
ASSISTANT_DEFAULTS: dict[str, Any] = {
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
}
SCHEDULES = ("constant", "heuristic", "heuristic_transient")
NO_EFFECT_INPUTS = frozenset(
    {"assistant_lookbehind", "target_lookbehind", "assistant_early_exit", "is_assistant",
     "speculation_type"}
)  # fmt: skip


def _check_no_effect(given: dict[str, Any]) -> None:
    for name in ("assistant_lookbehind", "target_lookbehind"):
        if name in given:
            _int(name, given[name], 0, ">= 0")
    if "assistant_early_exit" in given:
        _int("assistant_early_exit", given["assistant_early_exit"], 1, ">= 1")
    if "is_assistant" in given:
        _bool("is_assistant", given["is_assistant"])
    if "speculation_type" in given and given["speculation_type"] != "dflash":
        raise ParamValidationError(
            "speculation_type",
            f'`speculation_type` must be "dflash", got {given["speculation_type"]!r}',
        )


def resolve_speculative(pick: Callable[[str], Any], given: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams fields of speculative decoding, validated."""
    num = pick("prompt_lookup_num_tokens")
    if num is not None:
        num = _int("prompt_lookup_num_tokens", num, 1, ">= 1")
    ngram = pick("max_matching_ngram_size")
    if ngram is not None:
        ngram = _int("max_matching_ngram_size", ngram, 1, ">= 1")

    def value(name: str) -> Any:
        v = pick(name)
        return ASSISTANT_DEFAULTS[name] if v is None else v

    assistant = _int("num_assistant_tokens", value("num_assistant_tokens"), 1, ">= 1")
    schedule = value("num_assistant_tokens_schedule")
    if schedule not in SCHEDULES:
        raise ParamValidationError(
            "num_assistant_tokens_schedule",
            f"`num_assistant_tokens_schedule` must be one of {', '.join(SCHEDULES)}, "
            f"got {schedule!r}",
        )
    threshold = _finite("assistant_confidence_threshold", value("assistant_confidence_threshold"))
    if not 0.0 <= threshold < 1.0:
        raise ParamValidationError(
            "assistant_confidence_threshold",
            f"`assistant_confidence_threshold` must be in [0, 1), got {threshold}",
        )
    _check_no_effect(given)
    return {
        "prompt_lookup_num_tokens": num,
        "max_matching_ngram_size": ngram,
        "num_assistant_tokens": assistant,
        "num_assistant_tokens_schedule": schedule,
        "assistant_confidence_threshold": threshold,
    }
