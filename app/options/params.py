"""SamplingParams: one request's generate options after the resolve step (pure data, no torch).

app/options/resolve.py fills and validates them (`resolve_sampling_params`); the engine reads
them. Lengths are absolute after resolving (they count the prompt, as in transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from app.options.constraints import GrammarSpec
from app.options.registry import DEFAULTS

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

    # 0 (set by a route, never by resolve): a prompt-only request that finishes after its
    # prefill without sampling (OpenAI echo with max_tokens 0: prompt log-probs only).
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
    # Not an option: keep a matched stop string in the text (TGI routes, as generate's
    # stop_strings; vLLM's include_stop_str_in_output). False: the text ends before it.
    include_stop_str_in_output: bool = False
    # Not an option: leave special tokens out of the text (vLLM's skip_special_tokens; the
    # /v1 routes set it). False: their text shows (the token ids are the same either way).
    skip_special_tokens: bool = True
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
    # OpenAI / vLLM penalties over the generated tokens (not HF options: applied right after
    # repetition_penalty, logits_processors._penalties; 0 is off).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
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
    # API-only (not an HF field): return this many top alternatives per token (0..20).
    top_n_tokens: int = 0
    # Not an option: compute each chosen token's log-prob (off: see build_params).
    logprobs: bool = True
    # Not a generate option (the routes set it: OpenAI echo + logprobs, vLLM's
    # prompt_logprobs, TGI's decoder_input_details): return every prompt token's log-prob
    # given the tokens before it, with this many top alternatives (0: the token's own only);
    # None: none. The engine computes them in the batched prefill (model_runner.py).
    prompt_logprobs: int | None = None
    # Not an option (the routes set it from the request's model / adapter_id): the loaded
    # LoRA adapter the request runs with (app/engine/lora_registry.py); None: the base model.
    lora_name: str | None = None
    # Not an option (the routes set it likewise): the full model that runs the request when
    # the server serves several (--model NAME=PATH ...); None: the default (first) model.
    model_name: str | None = None
    # Prompt-lookup decoding (speculative: no effect on output, see engine/spec/decoder.py).
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    # Draft-model speculation (used when the engine has a draft model; no effect on output).
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "constant"
    assistant_confidence_threshold: float = 0.4
    # Token constraints (prefix_allowed_tokens_fn's HTTP forms; constraints.py).
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
        return prompt_len + DEFAULTS["max_length"]

    @property
    def has_logits_options(self) -> bool:
        """Whether any logits option beyond temperature / top-k / top-p / min length is active.

        Rows without one stay on the sampler's fast path.
        """
        if (
            self.repetition_penalty != 1.0
            or self.has_penalties
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

    @property
    def has_penalties(self) -> bool:
        """Whether the OpenAI presence / frequency penalty is on (no `generate` equivalent)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def logits_generate_kwargs(self) -> dict[str, Any]:
        """The logits options that are on, as `model.generate` keyword arguments (HF formats)."""
        out = {}
        for name in _LOGITS_FIELDS:
            value = getattr(self, name)
            if value is not None and value != DEFAULTS.get(name):  # defaults are "off"
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
