"""Validation of the decoding-strategy options (no torch): returned sequences, beams,
guidance, token healing, max_time, with transformers' rules (GenerationConfig.validate)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.options.checks import ParamValidationError, is_int
from app.options.checks import bool_ as _bool
from app.options.checks import finite as _finite
from app.options.registry import option_range


def _token_list_checked(name: str, value: Any, vocab_size: int | None) -> list[int]:
    if not isinstance(value, list) or not value or not all(is_int(t) and t >= 0 for t in value):
        raise ParamValidationError(name, f"`{name}` must be a non-empty list of token ids")
    if vocab_size is not None and max(value) >= vocab_size:
        raise ParamValidationError(name, f"`{name}` ids must be < {vocab_size}")
    return list(value)


def resolve_strategy(
    pick: Callable[[str], Any], given: dict[str, Any], do_sample: bool, vocab_size: int | None
) -> dict[str, Any]:
    """The SamplingParams fields of the decoding strategy, validated."""
    nrs = option_range("num_return_sequences").check_int(
        "num_return_sequences", pick("num_return_sequences")
    )
    num_beams = option_range("num_beams").check_int("num_beams", pick("num_beams"))
    length_penalty = _finite("length_penalty", pick("length_penalty"))
    early_stopping = pick("early_stopping")
    if early_stopping not in (True, False, "never"):
        raise ParamValidationError(
            "early_stopping",
            f'`early_stopping` must be true, false or "never", got {early_stopping!r}',
        )
    # GenerationConfig.validate's rules for the number of returned sequences.
    if num_beams > 1 and nrs > num_beams:
        raise ParamValidationError(
            "num_return_sequences",
            f"`num_return_sequences` ({nrs}) must be <= `num_beams` ({num_beams}) in beam search",
        )
    if num_beams == 1 and not do_sample and nrs != 1:
        raise ParamValidationError(
            "num_return_sequences",
            f"greedy decoding returns 1 sequence; `num_return_sequences` must be 1 (got {nrs}) "
            "unless do_sample=true or num_beams > 1",
        )
    for name in ("frequency_penalty", "presence_penalty"):
        # Beam search runs transformers' own processors (beam_search.py), which have no such
        # penalty; vLLM refuses penalties with beam search too.
        if num_beams > 1 and pick(name):
            raise ParamValidationError(
                name, f"`{name}` is not supported with beam search (num_beams > 1); omit it or 0"
            )
    max_time = pick("max_time")
    if max_time is not None:
        max_time = option_range("max_time").check_float("max_time", max_time)
    guidance = pick("guidance_scale")
    negative = given.get("negative_prompt_ids")
    if guidance is not None:
        guidance = _finite("guidance_scale", guidance)
        if guidance == 1:
            guidance = None  # HF skips the processor at exactly 1
    if guidance is not None and (num_beams > 1 or nrs > 1):
        raise ParamValidationError(
            "guidance_scale", "`guidance_scale` is served with num_beams = 1 and one sequence"
        )
    if negative is not None:
        negative = _token_list_checked("negative_prompt_ids", negative, vocab_size)
        if guidance is None:
            raise ParamValidationError(
                "negative_prompt_ids", "a negative prompt needs guidance_scale != 1"
            )
    token_healing = _bool("token_healing", pick("token_healing") or False)
    return {
        "num_return_sequences": nrs,
        "num_beams": num_beams,
        "length_penalty": length_penalty,
        "early_stopping": early_stopping,
        "max_time": max_time,
        "guidance_scale": guidance,
        "negative_prompt_ids": negative,
        "token_healing": token_healing,
    }
