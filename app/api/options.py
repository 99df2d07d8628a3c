"""Every `model.generate` option as an HTTP field (transformers 5.23 GenerationConfig names).

`GenerateOptions` declares each option once, so /docs lists them all and a typo is a 422 that
names it (extra="forbid"). Types and obvious bounds are checked here. What each option does
(served, accepted and ignored, 422 with the reason) is the option table's
(app/api/option_table.py, docs/options.md), applied by `generation.split_options`; the
engine's `resolve_sampling_params` does the model-aware validation (lengths against
n_positions, token ids against the vocabulary, cross-field rules). A value of null means
"omitted": the checkpoint's generation_config default applies, exactly as in
`model.generate`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TokenIds = int | list[int]


def _f(description: str, **kwargs: Any) -> Any:
    return Field(default=None, description=description, **kwargs)


class Grammar(BaseModel):
    """TGI's grammar object (app/engine/grammar_options.py validates the value)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"type": "json", "value": {"properties": {"이름": {"type": "string"}}}},
                {"type": "regex", "value": "(서울|부산)시 [가-힣]{2,4}구"},
            ]
        },
    )

    type: Literal["json", "json_object", "json_schema", "regex"] = Field(
        description='"json" (alias "json_object"): value is a JSON schema (object or JSON '
        'text); "json_schema": value is {"name", "schema"}; "regex": the output matches it.'
    )
    value: str | dict[str, Any] | None = Field(
        default=None, description='The schema or regex (may be omitted for "json_object").'
    )


class GenerateOptions(BaseModel):
    """The generate options shared by /generate, /generate_stream, /few-shot and the OpenAI
    routes' extra fields."""

    # strict: a JSON string is never a number or a boolean ("1", "true": 422, as in TGI and
    # OpenAI), so the schema /docs shows is exactly the one enforced.
    model_config = ConfigDict(extra="forbid", strict=True)

    # -- length and stopping ---------------------------------------------------------------
    max_new_tokens: int | None = _f("New tokens to generate (default: the checkpoint's).", ge=1)
    max_length: int | None = _f("Prompt + new tokens (max_new_tokens wins).", ge=1)
    min_new_tokens: int | None = _f("Eos is masked until this many new tokens.", ge=0)
    min_length: int | None = _f("Eos is masked until prompt + output reach this.", ge=0)
    max_time: float | None = _f("Stop after this many seconds.", gt=0, allow_inf_nan=False)
    early_stopping: bool | Literal["never"] | None = _f("Beam search stopping rule.")
    stop_strings: list[str] | str | None = _f("Stop when the output contains one of these.")
    eos_token_id: TokenIds | None = _f("Token id(s) that end generation.")
    pad_token_id: int | None = _f("Padding token id.", ge=0)
    bos_token_id: int | None = _f("Accepted; no effect (generation starts from the prompt).", ge=0)
    ignore_eos: bool | None = _f("Do not stop at eos (vLLM name; generate(eos_token_id=None)).")
    # -- strategy ----------------------------------------------------------------------------
    do_sample: bool | None = _f("Sample instead of greedy / beam search.")
    num_beams: int | None = _f("Beams for beam search (1 = no beam search).", ge=1)
    num_return_sequences: int | None = _f("Sequences returned (<= num_beams in beam search).", ge=1)
    length_penalty: float | None = _f("Beam score length exponent.", allow_inf_nan=False)
    use_cache: bool | None = _f("Accepted; the server always uses its paged KV cache.")
    seed: int | None = _f("Per-request seed: same tokens as torch.manual_seed(seed); generate().")
    # -- logits processing -------------------------------------------------------------------
    temperature: float | None = _f("Softmax temperature (> 0 when sampling).", ge=0)
    top_k: int | None = _f("Keep the k most likely tokens (0 disables).", ge=0)
    top_p: float | None = _f("Nucleus sampling mass, in (0, 1].", gt=0, le=1)
    min_p: float | None = _f("Min probability relative to the top token, in [0, 1].", ge=0, le=1)
    typical_p: float | None = _f("Locally typical sampling mass, in (0, 1].", gt=0, le=1)
    epsilon_cutoff: float | None = _f("Epsilon sampling cutoff, in [0, 1).", ge=0, lt=1)
    eta_cutoff: float | None = _f("Eta sampling cutoff, in [0, 1).", ge=0, lt=1)
    top_h: float | None = _f("Top-H (entropy) sampling mass, in (0, 1].", gt=0, le=1)
    repetition_penalty: float | None = _f("Penalty for repeated tokens (1.0 = off).", gt=0)
    no_repeat_ngram_size: int | None = _f("No n-gram of this size repeats (0 = off).", ge=0)
    bad_words_ids: list[list[int]] | None = _f("Token sequences that may not be generated.")
    bad_words: list[str] | None = _f("Words that may not be generated (tokenized server-side).")
    sequence_bias: list[list[Any]] | None = _f("Bias for token sequences: [[[ids...], bias], ...].")
    suppress_tokens: list[int] | None = _f("Token ids that are never generated.")
    begin_suppress_tokens: list[int] | None = _f("Token ids not generated as the first token.")
    forced_bos_token_id: int | None = _f("Token id forced as the first generated token.", ge=0)
    forced_eos_token_id: TokenIds | None = _f("Token id(s) forced when max_length is reached.")
    exponential_decay_length_penalty: list[Any] | None = _f(
        "[start_index, decay_factor]: eos becomes likelier after start_index new tokens."
    )
    renormalize_logits: bool | None = _f("Renormalize after the logits processors.")
    remove_invalid_values: bool | None = _f("Replace nan / inf logits.")
    guidance_scale: float | None = _f("Classifier-free guidance scale (1 = off).")
    negative_prompt: str | None = _f("Negative prompt text for classifier-free guidance.")
    negative_prompt_ids: list[int] | None = _f("Negative prompt token ids for guidance.")
    watermarking_config: dict[str, Any] | None = _f("transformers WatermarkingConfig fields.")
    token_healing: bool | None = _f("Heal the prompt's last token boundary.")
    allowed_token_ids: list[int] | None = _f(
        "Only these token ids may be generated (prefix_allowed_tokens_fn; eos only if listed)."
    )
    grammar: Grammar | None = _f(
        "Constrained output: a JSON schema or a regex the output must match (docs/grammar.md)."
    )
    # -- speculative (same output, only faster) ----------------------------------------------
    prompt_lookup_num_tokens: int | None = _f(
        "Prompt lookup: draft this many tokens from the text's own n-grams and verify them "
        "in one forward (faster on repetitive text; output identical).",
        ge=1,
    )
    max_matching_ngram_size: int | None = _f(
        "Prompt lookup: the longest n-gram matched (default 2; no effect on output).", ge=1
    )
    # -- outputs -----------------------------------------------------------------------------
    output_scores: bool | None = _f("true = `details: true` (per-token logprobs).")
    output_logits: bool | None = _f("true = `details: true` (per-token logprobs).")
    return_dict_in_generate: bool | None = _f("true = `details: true` (the response is a dict).")
    output_attentions: bool | None = _f("Return attentions (exact slow lane, size-capped).")
    output_hidden_states: bool | None = _f("Return hidden states (exact slow lane, size-capped).")
    # -- removed from transformers 5 core, served natively (app/engine/lanes/class_b) --------------
    num_beam_groups: int | None = _f("Group (diverse) beam search: groups of beams.", ge=1)
    diversity_penalty: float | None = _f("Group beam search: penalty per earlier group's token.")
    penalty_alpha: float | None = _f("Contrastive search degeneration penalty, in [0, 1].")
    dola_layers: str | list[int] | None = _f('DoLa layers: "low", "high" or layer indices.')
    constraints: list[Any] | None = _f(
        'Constrained beam search: {"type": "phrasal", "token_ids": [...]} or '
        '{"type": "disjunctive", "nested_token_ids": [[...], ...]} items.'
    )
    force_words_ids: list[Any] | None = _f(
        "Constrained beam search: token ids of words that must appear (a list of lists: one of)."
    )
    force_words: list[str | list[str]] | None = _f(
        "Words that must appear (tokenized server-side; a list of strings: one of them)."
    )
    # -- engine-owned (no effect on output) --------------------------------------------------
    cache_implementation: str | None = _f("Accepted; the server's paged KV cache is used.")
    cache_config: dict[str, Any] | None = _f("Accepted; see the server's KV cache flags.")
    max_cache_len: int | None = _f("Accepted; see the server's KV cache flags.")
    compile_config: dict[str, Any] | None = _f("Accepted; the server compiles by its own flags.")
    disable_compile: bool | None = _f("Accepted; no effect on output.")
    prefill_chunk_size: int | None = _f("Accepted; see --max-num-batched-tokens.")
    continuous_batching_config: dict[str, Any] | None = _f("Accepted; the server batches.")
    low_memory: bool | None = _f("Accepted; no effect on output.")
    # -- encoder-decoder / assisted decoding: 422 with the reason unless neutral -------------
    encoder_repetition_penalty: float | None = _f("Encoder-decoder only: rejected for GPT-2.")
    encoder_no_repeat_ngram_size: int | None = _f("Encoder-decoder only: rejected for GPT-2.")
    decoder_start_token_id: TokenIds | None = _f("Encoder-decoder only: rejected for GPT-2.")
    use_mtp: bool | None = _f("Multi-token prediction heads: not in GPT-2.")
    num_assistant_tokens: int | None = _f("Assisted decoding (needs --draft-model).")
    num_assistant_tokens_schedule: str | None = _f("Assisted decoding (needs --draft-model).")
    assistant_confidence_threshold: float | None = _f("Assisted decoding (needs --draft-model).")
    assistant_lookbehind: int | None = _f("Assisted decoding (needs --draft-model).")
    target_lookbehind: int | None = _f("Assisted decoding (needs --draft-model).")
    assistant_early_exit: int | None = _f("Assisted decoding (needs --draft-model).")
    assistant_ensemble_weight: float | None = _f("Assisted decoding (needs --draft-model).")
    is_assistant: bool | None = _f("Assisted decoding (needs --draft-model).")
    speculation_type: str | None = _f("Assisted decoding (needs --draft-model).")
    # -- API extras --------------------------------------------------------------------------
    top_n_tokens: int | None = _f("Return this many most likely alternatives per token.", ge=0)

    def engine_options(self, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """The options the caller set (null = omitted), for resolve_sampling_params."""
        return self.model_dump(exclude_none=True, exclude=set(exclude))


OPTION_NAMES: frozenset[str] = frozenset(GenerateOptions.model_fields)
