"""Validation of the speculative-decoding options (no torch). None of them changes the output
(drafts are verified against plain decoding, engine/spec/decoder.py); they only change the speed.

Prompt lookup: prompt_lookup_num_tokens, max_matching_ngram_size. Draft model (class E,
served when the server has --draft-model; the HTTP layer refuses them otherwise):
num_assistant_tokens, num_assistant_tokens_schedule, assistant_confidence_threshold, with
transformers' defaults (20, "constant", 0.4: the registry's), and options accepted with no
effect here:
assistant_lookbehind / target_lookbehind (they align two different tokenizers; the draft
shares the target's), assistant_early_exit and speculation_type (the configured draft model
drafts), is_assistant (transformers' internal flag).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.options.checks import ParamValidationError
from app.options.checks import bool_ as _bool
from app.options.registry import ASSISTANT_SCHEDULES, option_range

# GenerationConfig's fallback when max_matching_ngram_size is unset (generation/utils.py).
DEFAULT_MAX_MATCHING_NGRAM_SIZE = 2
NO_EFFECT_INPUTS = frozenset(
    {"assistant_lookbehind", "target_lookbehind", "assistant_early_exit", "is_assistant",
     "speculation_type"}
)  # fmt: skip


def _check_no_effect(given: dict[str, Any]) -> None:
    for name in ("assistant_lookbehind", "target_lookbehind", "assistant_early_exit"):
        if name in given:
            option_range(name).check_int(name, given[name])
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
        num = option_range("prompt_lookup_num_tokens").check_int("prompt_lookup_num_tokens", num)
    ngram = pick("max_matching_ngram_size")
    if ngram is not None:
        ngram = option_range("max_matching_ngram_size").check_int("max_matching_ngram_size", ngram)
    assistant = option_range("num_assistant_tokens").check_int(
        "num_assistant_tokens", pick("num_assistant_tokens")
    )
    schedule = pick("num_assistant_tokens_schedule")
    if schedule not in ASSISTANT_SCHEDULES:
        raise ParamValidationError(
            "num_assistant_tokens_schedule",
            f"`num_assistant_tokens_schedule` must be one of {', '.join(ASSISTANT_SCHEDULES)}, "
            f"got {schedule!r}",
        )
    threshold = option_range("assistant_confidence_threshold").check_float(
        "assistant_confidence_threshold", pick("assistant_confidence_threshold")
    )
    _check_no_effect(given)
    return {
        "prompt_lookup_num_tokens": num,
        "max_matching_ngram_size": ngram,
        "num_assistant_tokens": assistant,
        "num_assistant_tokens_schedule": schedule,
        "assistant_confidence_threshold": threshold,
    }
