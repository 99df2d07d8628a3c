"""SamplingParams: the core generate options, resolved and validated as `model.generate` does.

No torch import: the HTTP side builds and validates these before anything touches a tensor.

How transformers 5.23 fills an option the caller omitted (GenerationMixin.generate ->
_prepare_generation_config -> _prepare_generated_length):
  1. the caller's kwargs win; 2. else the checkpoint's generation_config (a value of None there
  means "unset"); 3. else the global table GenerationConfig._get_default_generation_params()
  (max_length 20, min_length 0, do_sample False, temperature 1.0, top_k 50, top_p 1.0,
  num_return_sequences 1).
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

The logits options (repetition_penalty ... watermarking_config, and the API-only `bad_words`
and `top_n_tokens`) are resolved and validated in logits_options.py, with its own list of
departures; `has_logits_options` tells the sampler whether a request needs the option path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from app.engine.grammar_options import GrammarSpec, resolve_constraints
from app.engine.logits_options import API_ONLY_INPUTS, LOGITS_DEFAULTS, resolve_logits_options
from app.engine.spec_options import NO_EFFECT_INPUTS, resolve_speculative
from app.engine.strategy_options import resolve_strategy
from app.engine.validation import ParamValidationError, is_int
from app.engine.validation import bool_ as _bool
from app.engine.validation import finite as _finite
from app.engine.validation import int_ as _int

# transformers.GenerationConfig._get_default_generation_params(), the fields we serve.
HF_GLOBAL_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "num_return_sequences": 1,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
}

_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # the range torch.Generator.manual_seed accepts
# The HF logits fields of SamplingParams (top_n_tokens is ours, not generate's).
_LOGITS_FIELDS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "renormalize_logits",
    "remove_invalid_values",
    "watermarking_config",
)


@dataclass
class SamplingParams:
    """Resolved generate options for one request. After `resolve_sampling_params`,
    `max_length` / `min_length` are absolute (they count the prompt, as in transformers) and
    `max_new_tokens` / `min_new_tokens` are the matching counts of new tokens. Built by hand,
    the usual precedence applies (see `stop_length`)."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    min_length: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    num_return_sequences: int = 1
    max_time: float | None = None  # seconds from admission (MaxTimeCriteria)
    # Classifier-free guidance: the negative prompt runs as a companion sequence.
    guidance_scale: float | None = None
    negative_prompt_ids: list[int] | None = None
    # Token healing rewrites the prompt's tail at admission (generate's heal_tokens).
    token_healing: bool = False
    # Beam search (sibling sequences sharing KV blocks; see beam_search.py).
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # Our extension (vLLM's name): eos neither stops nor is masked (generate(eos_token_id=None)).
    ignore_eos: bool = False
    # Logits options (HF names and semantics; None / neutral values are off).
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None  # includes the request's `bad_words`, tokenized
    sequence_bias: list[list[Any]] | None = None  # HF's list form [[token_ids, bias], ...]
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    top_h: float | None = None
    renormalize_logits: bool = False
    remove_invalid_values: bool = False
    watermarking_config: dict[str, Any] | None = None  # transformers.WatermarkingConfig fields
    # API-only (not an HF field): return this many top alternatives per token (0..5).
    top_n_tokens: int = 0
    # Not an option: compute each chosen token's log-prob (off: see build_params).
    logprobs: bool = True
    # Prompt-lookup decoding (speculative: no effect on output, see spec_decode.py).
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    # Draft-model speculation (used when the engine has a draft model; no effect on output).
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "constant"
    assistant_confidence_threshold: float = 0.4
    # Token constraints (prefix_allowed_tokens_fn's HTTP forms; grammar_options.py).
    grammar: GrammarSpec | None = None
    allowed_token_ids: list[int] | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The eos ids that stop generation (empty when ignore_eos or no eos)."""
        if self.ignore_eos or self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def stop_length(self, prompt_len: int) -> int:
        """Total length (prompt + output) at which generation stops (MaxLengthCriteria)."""
        if self.max_new_tokens is not None:
            return prompt_len + self.max_new_tokens
        if self.max_length is not None:
            return self.max_length
        return prompt_len + HF_GLOBAL_DEFAULTS["max_length"]

    @property
    def has_logits_options(self) -> bool:
        """Whether any logits option beyond temperature / top-k / top-p / min length is active.

        Rows without one stay on the sampler's fast path.
        """
        if (
            self.repetition_penalty != 1.0
            or self.no_repeat_ngram_size > 0
            or self.bad_words_ids
            or self.sequence_bias
            or self.suppress_tokens
            or self.begin_suppress_tokens
            or self.forced_bos_token_id is not None
            or self.forced_eos_token_id is not None
            or self.exponential_decay_length_penalty is not None
            or self.renormalize_logits
            or self.remove_invalid_values
            or self.watermarking_config is not None
        ):
            return True
        # The warpers apply only when sampling (as in _get_logits_processor).
        return self.do_sample and (
            self.min_p is not None
            or self.typical_p < 1.0
            or 0.0 < self.epsilon_cutoff < 1.0
            or 0.0 < self.eta_cutoff < 1.0
            or self.top_h is not None
        )

    def logits_generate_kwargs(self) -> dict[str, Any]:
        """The logits options that are on, as `model.generate` keyword arguments (HF formats)."""
        out = {}
        for name in _LOGITS_FIELDS:
            value = getattr(self, name)
            if value is not None and value != LOGITS_DEFAULTS.get(name):  # defaults are "off"
                out[name] = value
        return out

    @property
    def generate_kwargs(self) -> dict[str, Any]:
        """These resolved options as `model.generate` keyword arguments (lengths absolute)."""
        kwargs: dict[str, Any] = {
            "max_length": self.max_length,
            "min_length": self.min_length,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_return_sequences,
            "length_penalty": self.length_penalty,
            "early_stopping": self.early_stopping,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.stop_strings:
            kwargs["stop_strings"] = list(self.stop_strings)
        if self.max_time is not None:
            kwargs["max_time"] = self.max_time
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        return {**kwargs, **self.logits_generate_kwargs()}

    def min_total_length(self, prompt_len: int) -> int:
        """Eos is masked while the sequence (prompt + output) is shorter than this."""
        if self.min_new_tokens is not None:
            return max(self.min_length, prompt_len + self.min_new_tokens)
        return self.min_length


FIELD_NAMES: frozenset[str] = frozenset(f.name for f in fields(SamplingParams))
ACCEPTED_OPTIONS: frozenset[str] = FIELD_NAMES | API_ONLY_INPUTS | NO_EFFECT_INPUTS


def _token_ids(name: str, value: Any) -> int | list[int]:
    if is_int(value):
        return _int(name, value, 0, ">= 0 (a token id)")
    if isinstance(value, (list, tuple)) and value:
        return [_int(name, v, 0, ">= 0 (a token id)") for v in value]
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
        if name in given:
            return given[name]
        if name in model:
            return model[name]
        return HF_GLOBAL_DEFAULTS.get(name)

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
        max_new = _int("max_new_tokens", max_new, 1, ">= 1")  # HF: "must be greater than 0"
        max_length, length_field = prompt_len + max_new, "max_new_tokens"
    elif "max_length" not in given and "max_length" not in model:
        # HF: "by default let's always generate 20 new tokens", capped at max_position_embeddings.
        max_length = min(prompt_len + HF_GLOBAL_DEFAULTS["max_length"], n_positions)
        length_field = "max_new_tokens"
    else:
        max_length = _int("max_length", pick("max_length"), 1, ">= 1")
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
        min_new = _int("min_new_tokens", min_new, 0, ">= 0")
        min_length, min_field = prompt_len + min_new, "min_new_tokens"
    else:
        min_length, min_field = _int("min_length", pick("min_length"), 0, ">= 0"), "min_length"
    if min_length > max_length:
        raise ParamValidationError(
            min_field,
            f"`{min_field}` asks for a total length of at least {min_length} but generation "
            f"stops at {max_length} (prompt {prompt_len} + {max_length - prompt_len} new tokens); "
            f"`{min_field}` must not exceed the maximum length",
        )

    do_sample = _bool("do_sample", pick("do_sample"))
    temperature = _finite("temperature", pick("temperature"))
    if temperature < 0 or (do_sample and temperature == 0):
        # TemperatureLogitsWarper raises for temperature <= 0 when sampling.
        raise ParamValidationError(
            "temperature",
            f"`temperature` must be > 0 when do_sample=true (>= 0 otherwise), got {temperature}; "
            "for greedy decoding set do_sample=false",
        )
    top_k = _int("top_k", pick("top_k"), 0, ">= 0 (0 disables top-k)")
    top_p = _finite("top_p", pick("top_p"))
    if not 0.0 < top_p <= 1.0:
        raise ParamValidationError("top_p", f"`top_p` must be in (0, 1], got {top_p}")

    seed = given.get("seed")
    if seed is not None and (not is_int(seed) or not _SEED_MIN <= seed <= _SEED_MAX):
        raise ParamValidationError(
            "seed", f"`seed` must be an integer in [{_SEED_MIN}, {_SEED_MAX}], got {seed!r}"
        )

    eos = pick("eos_token_id")
    eos = None if eos is None else _token_ids("eos_token_id", eos)
    pad = pick("pad_token_id")
    if pad is not None:
        pad = _int("pad_token_id", pad, 0, ">= 0 (a token id)")
    elif eos is not None:
        pad = eos if isinstance(eos, int) else eos[0]

    stop = pick("stop_strings")
    stop_strings = [] if stop is None else _stop_strings(stop)

    strategy = resolve_strategy(pick, given, do_sample, vocab_size)
    ignore_eos = _bool("ignore_eos", given.get("ignore_eos", False))
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
