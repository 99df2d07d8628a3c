"""The logits generate options: resolved and validated as `model.generate` would take them.

No torch import (the HTTP side validates before anything touches a tensor). The rules are the
ones transformers 5.23 enforces in the LogitsProcessor constructors that `generate` builds
(GenerationConfig.validate checks almost none of them), plus these documented, stricter ones:
a range HF only ignores (typical_p > 1, epsilon_cutoff >= 1, a negative no_repeat_ngram_size)
is rejected; ints are accepted for float fields; biases must be finite; token ids must lie in
the vocabulary when its size is known (HF raises for most of them, silently ignores others);
an exponential_decay_length_penalty that would overflow a float before max_length is rejected
(HF raises OverflowError mid-generation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from app.options.checks import ParamValidationError, bool_, finite, int_, is_int
from app.options.registry import TORCH_SEED, option_range

# Accepted by resolve but not stored as such: `bad_words` is merged into bad_words_ids.
API_ONLY_INPUTS: frozenset[str] = frozenset({"bad_words"})
WATERMARK_DEFAULTS: dict[str, Any] = {  # transformers.WatermarkingConfig()
    "greenlist_ratio": 0.25,
    "bias": 2.0,
    "hashing_key": 15485863,
    "seeding_scheme": "lefthash",
    "context_width": 1,
}


def _token(name: str, value: Any, vocab_size: int | None) -> int:
    if not is_int(value) or value < 0 or (vocab_size is not None and value >= vocab_size):
        upper = f" and < {vocab_size} (the vocabulary size)" if vocab_size is not None else ""
        raise ParamValidationError(name, f"`{name}` token ids must be >= 0{upper}, got {value!r}")
    return int(value)


def _token_list(name: str, value: Any, vocab_size: int | None, allow_empty: bool) -> list[int]:
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        what = "a list" if allow_empty else "a non-empty list"
        raise ParamValidationError(name, f"`{name}` must be {what} of token ids, got {value!r}")
    return [_token(name, v, vocab_size) for v in value]


def _bad_words_ids(value: Any, vocab_size: int | None) -> list[list[int]]:
    name = "bad_words_ids"
    if not isinstance(value, (list, tuple)) or not value:
        raise ParamValidationError(
            name, f"`{name}` must be a non-empty list of non-empty token id lists, got {value!r}"
        )
    return [_token_list(name, seq, vocab_size, allow_empty=False) for seq in value]


def _bad_words(value: Any, encode: Callable[[str], list[int]] | None) -> list[list[int]]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ParamValidationError(
            "bad_words", f"`bad_words` must be a string or a non-empty list of them, got {value!r}"
        )
    if encode is None:
        raise ParamValidationError("bad_words", "`bad_words` needs a tokenizer; use bad_words_ids")
    out = []
    for word in items:
        ids = encode(word) if isinstance(word, str) and word else []
        if not ids:
            raise ParamValidationError(
                "bad_words", f"`bad_words` entries must be strings with >= 1 token, got {word!r}"
            )
        out.append(list(ids))
    return out


def _sequence_bias(value: Any, vocab_size: int | None) -> list[list[Any]]:
    """HF's list form [[ids, bias], ...], deduplicated as HF's dict conversion does."""
    name = "sequence_bias"
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = list(value)
    else:
        pairs = []
    if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise ParamValidationError(
            name,
            f"`{name}` must be a non-empty list of [token_ids, bias] pairs (or a dict "
            f"{{tuple(token_ids): bias}}), got {value!r}",
        )
    merged: dict[tuple[int, ...], float] = {}  # first position, last value: HF's dict(...)
    for ids, bias in pairs:
        seq = _token_list(name, ids, vocab_size, allow_empty=False)
        merged[tuple(seq)] = finite(name, bias)
    return [[list(k), v] for k, v in merged.items()]


def _exp_decay(value: Any, eos: tuple[int, ...], new_tokens: int) -> tuple[int, float]:
    name = "exponential_decay_length_penalty"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ParamValidationError(
            name, f"`{name}` must be a pair [start_index, decay_factor], got {value!r}"
        )
    start = int_(name, value[0], 0, ">= 0 for start_index")
    factor = finite(name, value[1])
    if factor <= 0:
        raise ParamValidationError(name, f"`{name}` decay_factor must be > 0, got {factor}")
    if not eos:
        raise ParamValidationError(name, f"`{name}` needs an eos_token_id (it raises eos scores)")
    steps = new_tokens - 1 - start  # largest exponent generate reaches before max_length
    if steps > 0:
        try:
            big = math.isfinite(factor**steps)
        except OverflowError:
            big = False
        if not big:
            raise ParamValidationError(
                name, f"`{name}` decay_factor {factor}**{steps} overflows; use a smaller factor"
            )
    return (start, factor)


def _watermark(value: Any) -> dict[str, Any]:
    name = "watermarking_config"
    if hasattr(value, "to_dict"):  # a transformers WatermarkingConfig from a checkpoint
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise ParamValidationError(name, f"`{name}` must be an object, got {value!r}")
    unknown = sorted(set(value) - set(WATERMARK_DEFAULTS))
    if unknown:
        raise ParamValidationError(
            name, f"`{name}` has unknown keys {unknown}; allowed: {sorted(WATERMARK_DEFAULTS)}"
        )
    cfg = {**WATERMARK_DEFAULTS, **{k: v for k, v in value.items() if v is not None}}
    ratio = finite(name, cfg["greenlist_ratio"])
    if not 0.0 < ratio < 1.0:  # WatermarkLogitsProcessor's rule
        raise ParamValidationError(name, f"`{name}.greenlist_ratio` must be in (0, 1), got {ratio}")
    if cfg["seeding_scheme"] not in ("lefthash", "selfhash"):
        raise ParamValidationError(
            name,
            f"`{name}.seeding_scheme` must be 'lefthash' or 'selfhash', got "
            f"{cfg['seeding_scheme']!r}",
        )
    if not is_int(cfg["hashing_key"]) or not TORCH_SEED.contains(cfg["hashing_key"]):
        # transformers hands it to torch as a 64-bit seed: wider values overflow there.
        raise ParamValidationError(
            name, f"`{name}.hashing_key` must be an integer in [-2**63, 2**64 - 1]"
        )
    return {
        "greenlist_ratio": ratio,
        "bias": finite(name, cfg["bias"]),
        "hashing_key": int(cfg["hashing_key"]),
        "seeding_scheme": cfg["seeding_scheme"],
        "context_width": int_(name, cfg["context_width"], 1, ">= 1 for context_width"),
    }


def resolve_logits_options(
    pick: Callable[[str], Any],
    given: Mapping[str, Any],
    *,
    eos: tuple[int, ...],
    prompt_len: int,
    max_length: int,
    encode: Callable[[str], list[int]] | None,
    vocab_size: int | None,
) -> dict[str, Any]:
    """The SamplingParams fields for the logits options (pick: user > checkpoint > default)."""
    get = pick

    def in_range(name: str, value: Any) -> Any:
        """The registry's range (RepetitionPenaltyLogitsProcessor: "strictly positive", ...)."""
        bounds = option_range(name)
        return (bounds.check_int if name == "no_repeat_ngram_size" else bounds.check_float)(
            name, value
        )

    out: dict[str, Any] = {}
    out["repetition_penalty"] = in_range("repetition_penalty", get("repetition_penalty"))
    for name in ("frequency_penalty", "presence_penalty"):  # OpenAI's [-2, 2]
        out[name] = in_range(name, get(name))
    out["no_repeat_ngram_size"] = in_range("no_repeat_ngram_size", get("no_repeat_ngram_size"))

    bad = get("bad_words_ids")
    bad_ids = [] if bad is None else _bad_words_ids(bad, vocab_size)
    if given.get("bad_words") is not None:
        words = _bad_words(given["bad_words"], encode)
        bad_ids += [_token_list("bad_words", w, vocab_size, allow_empty=False) for w in words]
    out["bad_words_ids"] = bad_ids or None
    bias = get("sequence_bias")
    out["sequence_bias"] = None if bias is None else _sequence_bias(bias, vocab_size)

    for name in ("suppress_tokens", "begin_suppress_tokens"):
        value = get(name)
        tokens = [] if value is None else _token_list(name, value, vocab_size, allow_empty=True)
        out[name] = tokens or None
    bos = get("forced_bos_token_id")
    out["forced_bos_token_id"] = (
        None if bos is None else _token("forced_bos_token_id", bos, vocab_size)
    )
    forced_eos = get("forced_eos_token_id")
    if forced_eos is not None:
        forced_eos = (
            _token("forced_eos_token_id", forced_eos, vocab_size)
            if is_int(forced_eos)
            else _token_list("forced_eos_token_id", forced_eos, vocab_size, allow_empty=False)
        )
    out["forced_eos_token_id"] = forced_eos
    suppressed = set(out["suppress_tokens"] or ())
    for name in ("forced_bos_token_id", "forced_eos_token_id"):  # GenerationConfig.validate 2.7
        forced = out[name]
        forced_set = {forced} if is_int(forced) else set(forced or ())
        if forced_set and forced_set <= suppressed:
            raise ParamValidationError(
                name,
                f"every token of `{name}` ({sorted(forced_set)}) is also in `suppress_tokens`"
                "; forcing a suppressed token leaves no finite logit",
            )

    decay = get("exponential_decay_length_penalty")
    out["exponential_decay_length_penalty"] = (
        None if decay is None else _exp_decay(decay, eos, max_length - prompt_len)
    )
    for name in ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"):
        value = get(name)  # min_p and top_h default to None (off)
        out[name] = None if value is None else in_range(name, value)
    out["renormalize_logits"] = bool_("renormalize_logits", get("renormalize_logits"))
    out["remove_invalid_values"] = bool_("remove_invalid_values", get("remove_invalid_values"))
    watermark = get("watermarking_config")
    out["watermarking_config"] = None if watermark is None else _watermark(watermark)
    out["top_n_tokens"] = option_range("top_n_tokens").check_int(
        "top_n_tokens", get("top_n_tokens")
    )
    return out
