"""The resolve step: a request's options -> validated SamplingParams, as `model.generate`
would take them (no torch: the HTTP side resolves before anything touches a tensor).

`resolve_request` is the one step the HTTP side runs: the registry's routing
(routing.split_options: ignored, refused, exact-lane and class-B options), the negative
prompt's tokens, `resolve_sampling_params` (every batched-engine option) and, when asked for,
the class-B method (class_b.resolve_class_b). Ranges come from the registry.

How transformers 5.23 fills an option the caller omitted (GenerationMixin.generate ->
_prepare_generation_config -> _prepare_generated_length), the registry's default precedence:
  1. the caller's kwargs win; 2. else the checkpoint's generation_config (a value of None there
  means "unset") for the options the registry marks `checkpoint`; 3. else the registry's
  `default`, the global table GenerationConfig._get_default_generation_params()
  (max_length 20, min_length 0, do_sample False, temperature 1.0, top_k 50, top_p 1.0,
  num_return_sequences 1, ...).
Lengths: max_new_tokens (from any level) takes precedence and becomes prompt + max_new_tokens.
When neither the caller nor the checkpoint set max_length, the default 20 means 20 NEW tokens
(max_length = prompt + 20, capped at n_positions); an explicit max_length counts the prompt.
min_new_tokens likewise overrides min_length (min_length = prompt + min_new_tokens).
pad_token_id falls back to the first eos id (_prepare_special_tokens).

Deliberate departures (documented, all stricter): a value of None in the request means
"omitted" (HF would set the field to None: top_k=None disables top-k there; use top_k=0);
ints are accepted for float fields; out-of-range values are rejected even when the current
mode would ignore them (HF only warns); min length > max length is rejected (HF warns and
stops at max length); top_p=0 and non-finite numbers are rejected (HF accepts them).

The stages by concern: strategy.py (beams, returned sequences, guidance, healing, max_time),
logits.py (the logits options, with their own list of departures), speculative.py,
constraints.py (grammar, allowed_token_ids), class_b.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from app.options.checks import ParamValidationError, is_int
from app.options.checks import bool_ as _bool
from app.options.checks import finite as _finite
from app.options.class_b import ClassBParams, MethodLimits, resolve_class_b
from app.options.constraints import resolve_constraints
from app.options.logits import API_ONLY_INPUTS, resolve_logits_options
from app.options.params import FIELD_NAMES, SamplingParams
from app.options.registry import DEFAULTS, OPTIONS, TOKEN_ID, option_range
from app.options.routing import split_options
from app.options.speculative import NO_EFFECT_INPUTS, resolve_speculative
from app.options.strategy import resolve_strategy

ACCEPTED_OPTIONS: frozenset[str] = FIELD_NAMES | API_ONLY_INPUTS | NO_EFFECT_INPUTS


def _token_ids(name: str, value: Any) -> int | list[int]:
    if is_int(value):
        return TOKEN_ID.check_int(name, value)
    if isinstance(value, (list, tuple)) and value:
        return [TOKEN_ID.check_int(name, v) for v in value]
    raise ParamValidationError(
        name, f"`{name}` must be a token id >= 0 or a non-empty list of them, got {value!r}"
    )


def _stop_strings(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ParamValidationError(
            "stop_strings",
            f"`stop_strings` must be a non-empty string or a list of them, got {value!r}",
        )
    return list(items)


def resolve_sampling_params(
    user: Mapping[str, Any],
    model_generation_config: Mapping[str, Any],
    n_positions: int,
    prompt_len: int,
    *,
    encode: Callable[[str], list[int]] | None = None,
    vocab_size: int | None = None,
) -> SamplingParams:
    """Fill omitted options as `model.generate` does, then validate against the model limits.

    `user`: the request's options (None = omitted). `model_generation_config`: the checkpoint's
    `model.generation_config.to_dict()` (None = unset; unrelated keys are ignored).
    `encode`: text -> token ids without special tokens, for `bad_words` (HF's docs:
    `tokenizer(words, add_special_tokens=False)`). `vocab_size`: when given, token ids in the
    logits options are checked against it.
    Raises ParamValidationError naming the offending field.
    """
    for key in user:
        if key not in ACCEPTED_OPTIONS:
            raise ParamValidationError(key, f"unknown or unsupported generate option `{key}`")
    given = {k: v for k, v in user.items() if v is not None}
    model = {k: v for k, v in model_generation_config.items() if v is not None}

    def pick(name: str) -> Any:
        """The registry's precedence: user > checkpoint (where it may set it) > default."""
        if name in given:
            return given[name]
        if name in model and OPTIONS[name].checkpoint:
            return model[name]
        return DEFAULTS.get(name)

    if prompt_len < 1:
        raise ParamValidationError("inputs", "the prompt must have at least one token")
    if prompt_len >= n_positions:
        raise ParamValidationError(
            "inputs",
            f"the prompt has {prompt_len} tokens but the model has {n_positions} positions; "
            f"a prompt may have at most {n_positions - 1} tokens",
        )

    # Lengths, as _prepare_generated_length does; `length_field` is what the user should change.
    max_new = pick("max_new_tokens")
    if max_new is not None:
        max_new = option_range("max_new_tokens").check_int("max_new_tokens", max_new)
        max_length, length_field = prompt_len + max_new, "max_new_tokens"
    elif "max_length" not in given and "max_length" not in model:
        # HF: "by default let's always generate 20 new tokens", capped at max_position_embeddings.
        max_length = min(prompt_len + DEFAULTS["max_length"], n_positions)
        length_field = "max_new_tokens"
    else:
        max_length = option_range("max_length").check_int("max_length", pick("max_length"))
        length_field = "max_length"
        if max_length <= prompt_len:  # HF raises the same ValueError
            raise ParamValidationError(
                "max_length",
                f"`max_length` ({max_length}) counts the prompt and must be greater than the "
                f"prompt length ({prompt_len}); set max_new_tokens instead",
            )
    if max_length > n_positions:
        limit = n_positions - prompt_len if length_field == "max_new_tokens" else n_positions
        raise ParamValidationError(
            length_field,
            f"prompt length ({prompt_len}) + new tokens ({max_length - prompt_len}) = {max_length} "
            f"exceeds the model's {n_positions} positions; `{length_field}` must be <= {limit}",
        )

    min_new = pick("min_new_tokens")
    if min_new is not None:
        min_new = option_range("min_new_tokens").check_int("min_new_tokens", min_new)
        min_length, min_field = prompt_len + min_new, "min_new_tokens"
    else:
        min_length = option_range("min_length").check_int("min_length", pick("min_length"))
        min_field = "min_length"
    if min_length > max_length:
        raise ParamValidationError(
            min_field,
            f"`{min_field}` asks for a total length of at least {min_length} but generation "
            f"stops at {max_length} (prompt {prompt_len} + {max_length - prompt_len} new tokens); "
            f"`{min_field}` must not exceed the maximum length",
        )

    do_sample = _bool("do_sample", pick("do_sample"))
    temperature = _finite("temperature", pick("temperature"))
    greedy = option_range("temperature")  # TemperatureLogitsWarper: > 0 when sampling
    if not greedy.contains(temperature) or (do_sample and temperature == 0):
        raise ParamValidationError(
            "temperature",
            f"`temperature` must be > 0 when do_sample=true ({greedy.text} otherwise), got "
            f"{temperature}; for greedy decoding set do_sample=false",
        )
    top_k = option_range("top_k").check_int("top_k", pick("top_k"))
    top_p = option_range("top_p").check_float("top_p", pick("top_p"))

    seed = pick("seed")
    if seed is not None:
        seed = option_range("seed").check_int("seed", seed)

    eos = pick("eos_token_id")
    eos = None if eos is None else _token_ids("eos_token_id", eos)
    pad = pick("pad_token_id")
    if pad is not None:
        pad = option_range("pad_token_id").check_int("pad_token_id", pad)
    elif eos is not None:
        pad = eos if isinstance(eos, int) else eos[0]

    stop = pick("stop_strings")
    stop_strings = [] if stop is None else _stop_strings(stop)

    strategy = resolve_strategy(pick, given, do_sample, vocab_size)
    ignore_eos = _bool("ignore_eos", pick("ignore_eos"))
    if ignore_eos and strategy["num_beams"] > 1:
        raise ParamValidationError("ignore_eos", "`ignore_eos` is not supported with num_beams > 1")
    logits = resolve_logits_options(
        pick,
        given,
        eos=() if ignore_eos or eos is None else ((eos,) if isinstance(eos, int) else tuple(eos)),
        prompt_len=prompt_len,
        max_length=max_length,
        encode=encode,
        vocab_size=vocab_size,
    )
    return SamplingParams(
        max_new_tokens=max_length - prompt_len,
        max_length=max_length,
        min_new_tokens=max(0, min_length - prompt_len),
        min_length=min_length,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos,
        pad_token_id=pad,
        stop_strings=stop_strings,
        ignore_eos=ignore_eos,
        **strategy,
        **logits,
        **resolve_speculative(pick, given),
        **resolve_constraints(given, vocab_size, {**strategy, **logits}),
    )


@dataclass(frozen=True)
class ModelLimits:
    """What the resolve step checks a request's options against."""

    generation_defaults: Mapping[str, Any]  # the checkpoint's generation_config (None: unset)
    max_total_tokens: int  # prompt + new tokens (the model's positions, or the server's cap)
    vocab_size: int
    num_layers: int  # DoLa's layer indices
    draft_model: bool = False  # assisted-decoding options are served
    max_constraint_work: int | None = None  # constraint tokens x beams (None: no limit)
    max_contrastive_work: int | None = None  # contrastive top_k x positions (None: no limit)
    max_dola_work: int | None = None  # DoLa premature layers x vocab (None: no limit)


def resolve_request(
    options: Mapping[str, Any],
    limits: ModelLimits,
    prompt_len: int,
    *,
    encode: Callable[[str], list[int]],
    exact_lane: bool = False,
) -> SamplingParams:
    """The one resolve step: route the options by the registry, then fill and validate them
    (HF precedence, ranges, cross-field and model-limit checks). A SamplingParams, or a
    ClassBParams when a class-B method is asked for; ParamValidationError names the field.

    `encode`: text -> token ids without special tokens (bad_words, force_words,
    negative_prompt). `exact_lane`: the caller serves output_attentions / output_hidden_states
    (app/engine/lanes/exact.py); elsewhere they are refused."""
    split = split_options(options, draft_model=limits.draft_model)
    if split.exact and not exact_lane:
        name = split.exact[0]
        raise ParamValidationError(
            name,
            f"`{name}` is served by the exact lane of POST /generate, POST / and "
            "/v1/completions without streaming only",
        )
    constrained = [n for n in ("grammar", "allowed_token_ids") if split.engine.get(n)]
    if split.exact and constrained:  # the exact lane runs generate without the constraint
        raise ParamValidationError(
            constrained[0], f"`{constrained[0]}` is not served with `{split.exact[0]}`"
        )
    engine = split.engine
    negative = engine.pop("negative_prompt", None)
    if negative is not None:
        if engine.get("negative_prompt_ids") is not None:
            raise ParamValidationError(
                "negative_prompt", "give `negative_prompt` or `negative_prompt_ids`, not both"
            )
        engine["negative_prompt_ids"] = encode(negative)
    try:
        params = resolve_sampling_params(
            engine,
            limits.generation_defaults,
            limits.max_total_tokens,
            prompt_len,
            encode=encode,
            vocab_size=limits.vocab_size,
        )
    except ParamValidationError as exc:
        if negative is not None and exc.field == "negative_prompt_ids":
            raise exc.renamed("negative_prompt") from exc  # named as the caller sent it
        raise
    check_negative_branch(params, prompt_len, limits, "negative_prompt" if negative else None)
    check_something_to_sample(params, limits.vocab_size)
    if split.exact:
        check_penalties_served(params, f"`{split.exact[0]}` (the exact lane runs `generate`)")
    if not split.class_b:
        return params
    params = resolve_class_b(
        split.class_b,
        params,
        num_layers=limits.num_layers,
        vocab_size=limits.vocab_size,
        encode=encode,
        prompt_len=prompt_len,
        limits=MethodLimits(
            limits.max_constraint_work, limits.max_contrastive_work, limits.max_dola_work
        ),
    )
    if split.exact and isinstance(params, ClassBParams):
        raise ParamValidationError(
            split.exact[0], f"`{split.exact[0]}` is not served with a class-B decoding method"
        )
    if isinstance(params, ClassBParams) and params.class_b is not None:
        check_penalties_served(params, "a class-B decoding method")
    return params


def check_penalties_served(params: SamplingParams, lane: str) -> None:
    """presence / frequency penalties run in the batched sampler only: the lanes that run
    transformers' own processors (the exact lane, class-B methods; beams: strategy.py) have
    no such processor, so a penalty there is a 422 rather than silently dropped."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(params, name) != 0.0:
            raise ParamValidationError(name, f"`{name}` is not supported with {lane}; omit it or 0")


def check_negative_branch(
    params: SamplingParams, prompt_len: int, limits: ModelLimits, named: str | None
) -> None:
    """Guidance runs a second sequence, the negative prompt followed by every generated
    token: it must fit the model's positions as the prompt's sequence does (priced here, so
    the batched forward never meets a position past the model's)."""
    negative = params.negative_prompt_ids
    if params.guidance_scale is None or not negative:
        return
    new_tokens = params.stop_length(prompt_len) - prompt_len
    needed = len(negative) + new_tokens
    if needed > limits.max_total_tokens:
        field = named or "negative_prompt_ids"
        raise ParamValidationError(
            field,
            f"`{field}` has {len(negative)} tokens; with up to {new_tokens} new tokens the "
            f"guidance branch needs {needed} positions, over the limit of "
            f"{limits.max_total_tokens} (prompt + new tokens)",
        )


def check_something_to_sample(params: SamplingParams, vocab_size: int) -> None:
    """Sampling needs at least one token left: `generate` raises ("probability tensor
    contains either inf, nan or element < 0") when every token is banned. Detectable here
    for the token lists (a grammar's dead ends are the sampler's to report)."""
    if not params.do_sample:
        return  # greedy takes the argmax of an all -inf row, as generate does
    banned: set[int] = set()
    for name, tokens in (
        ("suppress_tokens", params.suppress_tokens or ()),
        ("bad_words_ids", [w[0] for w in params.bad_words_ids or () if len(w) == 1]),
        ("begin_suppress_tokens", params.begin_suppress_tokens or ()),
    ):
        banned |= {t for t in tokens if 0 <= t < vocab_size}
        if len(banned) >= vocab_size:  # the field that completed the ban is named
            raise ParamValidationError(
                name,
                f"`{name}` (with the tokens banned before it: suppress_tokens, single-token "
                f"bad_words_ids) bans every one of the {vocab_size} tokens: nothing is left "
                "to sample",
            )
