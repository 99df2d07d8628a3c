"""Every generate option in one machine-readable table (pure data, no torch).

One entry per field of transformers' `GenerationConfig` (5.23) plus the API's own options.
Columns: the contract class (../shared/GENERATE_OPTIONS.md: A..F, or "API" for API-only
fields), type, allowed range, default when omitted, status, `via` (who handles a served
value: the batched engine, the HTTP layer, or the exact slow lane), the tests that cover
it, a valid example (served fields) and the neutral values that count as "omitted" for a
field that is rejected. `split_options` (option_routing.py) drives the behaviour from it, and
tests/unit/test_option_table.py keeps it true. docs/options.md is generated:

    python -m app.api.option_table --markdown > docs/options.md
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from app.engine.transformers_version import MATCHED_TRANSFORMERS

SERVED, IGNORED, REJECTED, NOT_YET = "served", "accepted-ignored", "rejected-422", "not-yet"
STATUSES = (SERVED, IGNORED, REJECTED, NOT_YET)
CLASSES = ("A", "B", "C", "D", "E", "F", "API")
GENERATION_CONFIG_CLASSES = frozenset("ABCDE")  # F and API fields are not GenerationConfig's

NOT_APPLICABLE = "not applicable to a decoder-only GPT-2 (it needs an encoder-decoder model)"
NO_DRAFT = "no draft model configured: assisted decoding needs one (start the server with " \
    "--draft-model)"  # fmt: skip
LOSSY = (
    "refused: ensemble verification changes the output, and speculative decoding here is "
    "lossless (identical to plain decoding); without --draft-model: no draft model configured"
)


@dataclass(frozen=True)
class OptionSpec:
    name: str
    cls: str
    type: str
    range: str
    default: str
    status: str
    tests: tuple[str, ...]
    via: str = "engine"  # served: "engine", "api" (HTTP layer), "exact-lane", "class-b"; else "-"
    example: dict[str, Any] | None = None  # served via the engine: options resolve accepts
    neutral: tuple[Any, ...] = ()  # rejected / not-yet: values accepted as "omitted"
    note: str = ""


# -- the tests that cover the options (pytest node ids, file::function) -------------------
_CONF = "tests/conformance/test_generate_conformance.py::"
C_EACH, C_SEED = _CONF + "test_each_option", _CONF + "test_seed_examples"
C_GUIDE = _CONF + "test_guidance_with_negative_prompt"
C_HEAL = _CONF + "test_token_healing"
_LOG = "tests/unit/test_logits_options.py::"
L_GREEDY, L_SAMPLE = _LOG + "test_option_alone_greedy", _LOG + "test_option_alone_sampling"
L_VALID = "tests/unit/test_logits_options_validation.py::test_invalid_values_name_the_field"
_SAMP = "tests/unit/test_sampler.py::"
S_DEFAULTS = _SAMP + "test_defaults_follow_generate"
S_VALID = _SAMP + "test_validation_names_the_field"
S_PREC = _SAMP + "test_max_new_tokens_takes_precedence"
S_SINGLE = _SAMP + "test_single_request_matches_generate"
_STOP = "tests/unit/test_stop.py::"
_TGI, _OAI = "tests/integration/test_tgi_api.py::", "tests/integration/test_openai_api.py::"
T_DETAILS = _TGI + "test_details_options"
_OC = "tests/integration/test_option_classes.py::"
OC_SAME = _OC + "test_no_effect_options_keep_the_output"
OC_LOOKUP = _OC + "test_prompt_lookup_is_accepted_with_identical_output"
OC_E, OC_B = _OC + "test_not_applicable_options_name_field_and_reason", _OC + "test_not_yet_options"
OC_SCORES, OC_ALIASES = _OC + "test_output_flags_turn_on_details", _OC + "test_api_aliases"
OC_NEG = _OC + "test_negative_prompt_text_equals_ids"
OC_EXACT = (
    _OC + "test_exact_lane_greedy_shapes_and_tokens",
    _OC + "test_exact_lane_seeded_sample_equals_engine",
    _OC + "test_exact_lane_cap_and_streaming_422",
)
OT_SPLIT = "tests/unit/test_option_table.py::test_split_options_by_class"
_GH = "tests/integration/test_grammar_http.py::"
G_ENGINE = "tests/unit/test_grammar_engine.py::test_constrained_request_alone_and_in_a_busy_batch"
G_INVALID = (
    "tests/unit/test_grammar.py::test_invalid_grammars_name_the_field_with_the_library_message"
)
WM_DETECT = "tests/integration/test_watermark_detect.py::test_watermarked_text_is_detected"
_SPEC = "tests/conformance/test_speculative_conformance.py::"
SPEC_SAME, SPEC_FEWER = (
    _SPEC + "test_prompt_lookup_output_equals_generate",
    _SPEC + "test_drafts_are_accepted_and_save_steps",
)
SPEC_NGRAM = _SPEC + "test_ngram_size_and_draft_length_change_only_the_speed"
SPEC_DRAFT = (
    "tests/conformance/test_draft_model_conformance.py::test_draft_model_output_equals_plain"
)


def _o(name: str, cls: str, type_: str, range_: str, default: str, status: str,
       tests: tuple[str, ...] | str, **kw: Any) -> OptionSpec:  # fmt: skip
    tests = (tests,) if isinstance(tests, str) else tests
    via = kw.pop("via", "engine" if status == SERVED else "-")
    return OptionSpec(name, cls, type_, range_, default, status, tests, via, **kw)


def _a(name: str, type_: str, range_: str, default: str, tests: tuple[str, ...] | str,
       example: Any, **kw: Any) -> OptionSpec:  # fmt: skip
    """A class-A option served by the batched engine."""
    ex = example if isinstance(example, dict) and name in example else {name: example}
    return _o(name, "A", type_, range_, default, SERVED, tests, example=ex, **kw)


def _d(name: str, type_: str, flag: str) -> OptionSpec:
    return _o(name, "D", type_, "any", "engine-owned", IGNORED, (OC_SAME, OT_SPLIT), note=flag)


# GenerationConfig._get_default_generation_params() fields among the refused ones: their
# neutral value is HF's default; the others default to null.
_HF_DEFAULTED = frozenset(
    [
        "encoder_repetition_penalty",
        "encoder_no_repeat_ngram_size",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
    ]
)


def _e(name: str, type_: str, neutral: tuple[Any, ...], reason: str) -> OptionSpec:
    default = repr(neutral[0]) if name in _HF_DEFAULTED else "null"
    return _o(name, "E", type_, "neutral only", default, REJECTED, (OC_E, OT_SPLIT),
              neutral=neutral, note=reason)  # fmt: skip


_CB = "tests/unit/test_class_b_"
CB_REF = _CB + "reference.py::test_same_tokens_as_transformers_4"
CB_VALID = _CB + "options.py::test_invalid_values_name_field_and_range"
CB_HTTP = "tests/integration/test_class_b_http.py::test_each_method_over_generate_and_completions"


def _b(name: str, type_: str, range_: str, default: str, tests: tuple[str, ...],
       what: str) -> OptionSpec:  # fmt: skip
    """A class-B option: served natively, one request at a time between batch steps."""
    return _o(name, "B", type_, range_, default, SERVED, (CB_REF, *tests, CB_VALID, CB_HTTP),
              via="class-b", note=what + " (transformers 4.x's algorithm; README: Decoding "
              "methods beyond transformers 5)")  # fmt: skip


def _x(name: str, type_: str, range_: str, example: Any, neutral: tuple[Any, ...],
       note: str) -> OptionSpec:  # fmt: skip
    """A class-E assisted-decoding option: served with --draft-model (output identical to
    plain decoding), else refused unless neutral (split_options)."""
    default = repr(neutral[0]) if name in _HF_DEFAULTED else "null"
    return _o(name, "E", type_, range_, default, SERVED, (SPEC_DRAFT, OC_E, OT_SPLIT),
              example={name: example}, neutral=neutral,
              note="needs --draft-model, else 422 (no draft model); " + note)  # fmt: skip


SOFT = "checkpoint, else "  # the checkpoint's generation_config, else HF's global default
TOKEN_IDS = "token ids < vocab"
_ROWS: list[OptionSpec] = [
    # -- A: length and stopping ----------------------------------------------------------
    _a("max_length", "int", "prompt < value <= n_positions", SOFT + "prompt + 20",
       (_SAMP + "test_explicit_max_length_counts_the_prompt", C_SEED), 12),
    _a("max_new_tokens", "int", ">= 1, prompt + value <= n_positions", SOFT + "20",
       (S_DEFAULTS, S_PREC), 5),
    _a("min_length", "int", ">= 0, <= max length", SOFT + "0", (C_EACH, S_PREC), 6),
    _a("min_new_tokens", "int", ">= 0, <= max new tokens", "null", (C_EACH, S_PREC), 2),
    _a("max_time", "float", "> 0 (seconds)", "null", (C_EACH, "tests/unit/test_engine.py::"
       "test_max_time_stops_generation"), 30.0),
    _a("early_stopping", 'bool | "never"', 'true, false, "never"', SOFT + "false",
       (C_SEED, C_EACH), {"early_stopping": "never", "num_beams": 2}),
    _a("stop_strings", "str | list[str]", "non-empty strings (alias `stop`)", SOFT + "null",
       (C_EACH, _STOP + "test_stop_strings_match_hf_criteria_every_step"), ["다."]),
    _a("eos_token_id", "int | list[int]", TOKEN_IDS, "checkpoint",
       (C_SEED, C_EACH, _STOP + "test_eos_int_and_list"), [1, 8]),
    _a("pad_token_id", "int", TOKEN_IDS, SOFT + "the first eos id", C_EACH, 0),
    _o("bos_token_id", "A", "int", ">= 0", "checkpoint", IGNORED, OC_SAME,
       note="no effect: generation always starts from the given prompt"),
    # -- A: strategy ---------------------------------------------------------------------
    _a("do_sample", "bool", "true, false", SOFT + "false", (C_SEED, S_SINGLE), True),
    _a("num_beams", "int", ">= 1", SOFT + "1",
       (C_SEED, C_EACH, _TGI + "test_beam_search_token_texts"), 3),
    _a("num_return_sequences", "int", ">= 1; <= num_beams with beams; 1 when greedy", SOFT + "1",
       (C_SEED, _OAI + "test_n_and_best_of"), {"num_return_sequences": 2, "do_sample": True}),
    _a("length_penalty", "float", "finite", SOFT + "1.0", C_EACH, 2.0),
    _o("use_cache", "A", "bool", "true, false", "true", IGNORED, OC_SAME,
       note="no effect on output: the paged KV cache is always used"),
    # -- A: logits -----------------------------------------------------------------------
    _a("temperature", "float", ">= 0; > 0 when sampling", SOFT + "1.0", (C_SEED, S_VALID), 0.7),
    _a("top_k", "int", ">= 0 (0 disables)", SOFT + "50", (C_SEED, S_SINGLE), 20),
    _a("top_p", "float", "(0, 1]", SOFT + "1.0", (C_SEED, S_SINGLE), 0.9),
    _a("min_p", "float", "[0, 1]", "null (off)", (L_SAMPLE, C_EACH), 0.1),
    _a("typical_p", "float", "(0, 1]", SOFT + "1.0 (off)", (L_SAMPLE, C_EACH), 0.8),
    _a("epsilon_cutoff", "float", "[0, 1)", SOFT + "0.0 (off)", (L_SAMPLE, C_EACH), 0.001),
    _a("eta_cutoff", "float", "[0, 1)", SOFT + "0.0 (off)", (L_SAMPLE, C_EACH), 0.001),
    _a("top_h", "float", "(0, 1]", "null (off)", (L_SAMPLE, C_EACH), 0.5),
    _a("repetition_penalty", "float", "> 0", SOFT + "1.0 (off)", (L_GREEDY, C_EACH, L_VALID), 1.3),
    _a("no_repeat_ngram_size", "int", ">= 0 (0 off)", SOFT + "0 (off)", (L_GREEDY, C_EACH), 3),
    _a("bad_words_ids", "list[list[int]]", "non-empty lists of " + TOKEN_IDS, SOFT + "null",
       (L_GREEDY, C_SEED), [[5], [300, 301]]),
    _a("sequence_bias", "list[[list[int], float]]", "finite biases, " + TOKEN_IDS, "null",
       (L_GREEDY, C_EACH, _OAI + "test_logit_bias_forces_a_token"), [[[10], 5.0]]),
    _a("suppress_tokens", "list[int]", TOKEN_IDS, SOFT + "null", (L_GREEDY, C_EACH), [10, 11]),
    _a("begin_suppress_tokens", "list[int]", TOKEN_IDS, SOFT + "null", (L_GREEDY, C_EACH), [10]),
    _a("forced_bos_token_id", "int", TOKEN_IDS, SOFT + "null",
       _LOG + "test_forced_bos_on_a_one_token_prompt", 7),
    _a("forced_eos_token_id", "int | list[int]", TOKEN_IDS, SOFT + "null", (L_GREEDY, C_EACH), 1),
    _a("exponential_decay_length_penalty", "[int, float]", "start >= 0, factor > 0", "null",
       (L_GREEDY, C_EACH), [5, 1.5]),
    _a("renormalize_logits", "bool", "true, false", SOFT + "false", (L_GREEDY, C_EACH), True),
    _a("remove_invalid_values", "bool", "true, false", SOFT + "false",
       (L_GREEDY, _LOG + "test_remove_invalid_values_on_non_finite_logits"), True),
    _a("guidance_scale", "float", "finite; 1 = off; num_beams 1, one sequence", "null (off)",
       (C_EACH, C_GUIDE, OC_NEG), 1.5),
    _a("watermarking_config", "dict", "WatermarkingConfig fields", "null (off)",
       (L_GREEDY, OC_ALIASES, WM_DETECT), {"bias": 3.0},
       note="detect with POST /watermark/detect (transformers' WatermarkDetector)"),
    _a("token_healing", "bool", "true, false", "false", C_HEAL, True),
    _a("prompt_lookup_num_tokens", "int", ">= 1", SOFT + "null (off)",
       (SPEC_SAME, SPEC_FEWER, OC_LOOKUP), 3,
       note="speculative: drafts from the sequence's own n-grams, verified in one forward; "
       "output identical to the request without it (beams, n > 1 and guidance decode "
       "plainly)"),
    _a("max_matching_ngram_size", "int", ">= 1", SOFT + "null (2)",
       (SPEC_NGRAM, "tests/unit/test_ngram_proposer.py::test_matches_transformers"),
       {"max_matching_ngram_size": 3, "prompt_lookup_num_tokens": 3},
       note="prompt lookup's longest n-gram; no effect on output"),
    # -- A: outputs (mapped to `details`) ------------------------------------------------
    *(
        _o(name, "A", "bool", "true, false", "false", SERVED, (OC_SCORES, OT_SPLIT), via="api",
           note="true = `details: true` on the TGI routes (per-token id, text, logprob, "
           "top_n_tokens alternatives); /v1: use `logprobs`")
        for name in ("output_scores", "output_logits", "return_dict_in_generate")
    ),
    # -- B: removed from transformers 5 core -------------------------------------------
    _b("num_beam_groups", "int", ">= 1; divides num_beams; > 1 needs diversity_penalty > 0 "
       "and do_sample false", "1 (off)", (_CB + "group_beam.py::test_groups_differ",),
       "group (diverse) beam search"),
    _b("diversity_penalty", "float", "> 0 with num_beam_groups > 1; 0 = off", "0.0 (off)",
       (_CB + "group_beam.py::test_penalty_subtracts_earlier_groups_tokens",),
       "diverse beam search: subtracted per earlier group's pick of a token"),
    _b("penalty_alpha", "float", "[0, 1]; > 0 needs top_k > 1, num_beams 1, do_sample false",
       "null (off)", (_CB + "contrastive.py::test_picks_by_the_degeneration_penalty",),
       "contrastive search (with top_k candidates)"),
    _b("dola_layers", 'str | list[int]', '"low", "high" or layers in [0, n_layer); num_beams 1',
       "null (off)", (_CB + "dola.py::test_contrasts_the_chosen_layers",),
       "DoLa decoding (greedy or sampling; repetition_penalty 1.2 recommended)"),
    _b("constraints", "list[object]", '{"type": "phrasal", "token_ids"} or {"type": '
       '"disjunctive", "nested_token_ids"}; num_beams > 1', "null",
       (_CB + "constrained_beam.py::test_every_forced_word_appears",),
       "constrained beam search"),
    _b("force_words_ids", "list[list[int]] | list[list[list[int]]]", TOKEN_IDS + "; a list of "
       "lists = one of them; num_beams > 1", "null",
       (_CB + "constrained_beam.py::test_every_forced_word_appears",),
       "constrained beam search: every word appears"),
    # -- C: diagnostic outputs (the exact slow lane) -----------------------------------
    *(
        _o(name, "C", "bool", "true, false; size-capped (--exact-lane-max-floats)", "false",
           SERVED, (*OC_EXACT, OT_SPLIT), via="exact-lane",
           note="transformers' own generate for this request alone, run on the engine thread; "
           f"`details.{name[7:]}`; POST /generate, / and non-streaming /v1/completions only")
        for name in ("output_attentions", "output_hidden_states")
    ),
    # -- D: engine-owned settings (no effect on output) --------------------------------
    _d("cache_implementation", "str", "paged KV cache: --block-size, --num-kv-blocks, "
       "--kv-cache-memory-gb"),
    _d("cache_config", "dict", "--block-size, --num-kv-blocks, --kv-cache-memory-gb"),
    _d("max_cache_len", "int", "--max-total-tokens (and the KV pool: --num-kv-blocks)"),
    _d("compile_config", "dict", "none: the paged forward is not compiled"),
    _d("disable_compile", "bool", "none: the paged forward is not compiled"),
    _d("prefill_chunk_size", "int", "--max-num-batched-tokens (chunked prefill budget)"),
    _d("continuous_batching_config", "dict", "--max-num-seqs, --max-num-batched-tokens, "
       "--max-waiting-requests"),
    _d("low_memory", "bool", "--max-num-seqs (beams always run as one batch); HF's beam "
       "search raises for low_memory=true, here it is ignored"),
    # -- E: not applicable -------------------------------------------------------------
    _e("encoder_repetition_penalty", "float", (1.0, 1), NOT_APPLICABLE),
    _e("encoder_no_repeat_ngram_size", "int", (0,), NOT_APPLICABLE),
    _e("decoder_start_token_id", "int | list[int]", (), NOT_APPLICABLE),
    _e("use_mtp", "bool", (False,), "GPT-2 has no multi-token prediction heads"),
    _x("num_assistant_tokens", "int", ">= 1", 5, (20,), "drafts per step (the heuristic "
       "schedules' start value)"),
    _x("num_assistant_tokens_schedule", "str", '"constant", "heuristic", "heuristic_transient"',
       "heuristic", ("constant",), "heuristic: 2 more drafts after a fully accepted step, "
       "else 1 fewer (per request, so heuristic_transient is the same)"),
    _x("assistant_confidence_threshold", "float", "[0, 1)", 0.5, (0.4,), "drafting stops "
       "after a draft the draft model gives less probability (fixed; transformers re-tunes it)"),
    _x("assistant_lookbehind", "int", ">= 0", 3, (10,), "no effect: the draft shares the "
       "model's tokenizer (nothing to re-align)"),
    _x("target_lookbehind", "int", ">= 0", 3, (10,), "no effect: the draft shares the "
       "model's tokenizer (nothing to re-align)"),
    _x("assistant_early_exit", "int", ">= 1", 2, (), "no effect: the --draft-model drafts, "
       "not the model's first layers"),
    _e("assistant_ensemble_weight", "float", (), LOSSY),
    _x("is_assistant", "bool", "true, false", True, (False,), "no effect (transformers' "
       "internal flag)"),
    _x("speculation_type", "str", '"dflash"', "dflash", (), "no effect: the --draft-model "
       "drafts (ordinary assisted decoding)"),
    # -- F: HTTP equivalents of Python-only generate() arguments ------------------------
    _o("negative_prompt_ids", "F", "list[int]", "non-empty " + TOKEN_IDS + "; needs "
       "guidance_scale != 1", "null (the prompt's last token)", SERVED, (C_GUIDE, OC_NEG),
       example={"negative_prompt_ids": [5, 6], "guidance_scale": 1.5}),
    _o("negative_prompt", "F", "str", "non-empty; not with negative_prompt_ids", "null", SERVED,
       OC_NEG, via="api", note="tokenized into negative_prompt_ids"),
    _o("allowed_token_ids", "F", "list[int]", "non-empty " + TOKEN_IDS + "; num_beams 1",
       "null", SERVED, (G_ENGINE, _GH + "test_allowed_token_ids"),
       example={"allowed_token_ids": [1, 5, 6]},
       note="prefix_allowed_tokens_fn's HTTP form: only these ids (eos only if listed)"),
    _o("grammar", "F", '{"type": "json" | "json_object" | "json_schema" | "regex", "value"}',
       "a valid JSON schema or regex; num_beams 1", "null", SERVED,
       (G_ENGINE, _GH + "test_generate_json_and_regex", G_INVALID),
       example={"grammar": {"type": "regex", "value": "[0-9]+"}},
       note="grammar-constrained output (llguidance, docs/grammar.md); prefix_allowed_tokens_fn's "
       "place in the processor order; /v1 routes: also `response_format`"),
    # -- API-only options ----------------------------------------------------------------
    _o("seed", "API", "int", "[-2**63, 2**64 - 1]", "null (the engine's generator)", SERVED,
       ("tests/integration/test_server_basics.py::test_seeded_sampling_is_reproducible", C_SEED),
       example={"seed": 42, "do_sample": True}),
    _o("stop", "API", "list[str]", "non-empty strings", "null", SERVED, OC_ALIASES, via="api",
       note="TGI's name, merged into stop_strings"),
    _o("bad_words", "API", "list[str]", "words of >= 1 token", "null", SERVED,
       _LOG + "test_bad_words_strings_are_tokenized_without_specials",
       example={"bad_words": ["국민"]}, note="tokenized into bad_words_ids"),
    _o("force_words", "API", "list[str | list[str]]", "words of >= 1 token; a list = one of "
       "them; num_beams > 1", "null", SERVED,
       (_CB + "options.py::test_force_words_strings_are_tokenized", CB_HTTP), via="class-b",
       note="tokenized into force_words_ids (constrained beam search)"),
    _o("ignore_eos", "API", "bool", "true, false (not with beams)", "false", SERVED,
       (_STOP + "test_ignore_eos_and_no_eos", _TGI + "test_stream_text_is_utf8_safe"),
       example={"ignore_eos": True}, note="generate(eos_token_id=None)"),
    _o("top_n_tokens", "API", "int", "0..5", "0", SERVED,
       (L_GREEDY, _OAI + "test_logprobs_and_echo"), example={"top_n_tokens": 3}),
    _o("input_ids", "API", "list[int]", "non-empty " + TOKEN_IDS, "null (use `inputs`)", SERVED,
       T_DETAILS, via="api", note="the prompt as token ids (TGI routes; /v1: `prompt`)"),
    _o("details", "API", "bool", "true, false", "false", SERVED,
       (T_DETAILS, "tests/integration/test_server_basics.py::test_generate_details"), via="api"),
    _o("decoder_input_details", "API", "bool", "true, false", "false", SERVED, T_DETAILS,
       via="api"),
    _o("return_full_text", "API", "bool", "true, false", "false", SERVED, T_DETAILS, via="api"),
    _o("truncate", "API", "int", ">= 1", "null", SERVED, T_DETAILS, via="api"),
    _o("best_of", "API", "int", ">= 1", "null", SERVED, _TGI + "test_best_of", via="api",
       note="num_return_sequences; the most likely is returned"),
    _o("watermark", "API", "bool", "true, false", "false", SERVED, OC_ALIASES, via="api",
       note="watermarking_config = transformers' default WatermarkingConfig"),
    _o("frequency_penalty", "API", "float", "0 only", "null", NOT_YET, OC_B, neutral=(0, 0.0),
       note="no transformers equivalent; use repetition_penalty"),
    _o("adapter_id", "API", "str", "-", "null", REJECTED, OC_B, note="no LoRA adapters are served"),
]  # fmt: skip

OPTION_TABLE: dict[str, OptionSpec] = {row.name: row for row in _ROWS}
# Served only when the server has a draft model (--draft-model); split_options refuses them
# otherwise.
NEEDS_DRAFT_MODEL = frozenset(
    n for n, r in OPTION_TABLE.items() if r.cls == "E" and r.status == SERVED
)
EXACT_LANE_OPTIONS = tuple(n for n, r in OPTION_TABLE.items() if r.via == "exact-lane")
DETAILS_OPTIONS = ("output_scores", "output_logits", "return_dict_in_generate")


def markdown() -> str:
    """docs/options.md: the table as markdown."""
    lines = [
        "# Generate options",
        "",
        "Generated from `app/api/option_table.py` by "
        "`python -m app.api.option_table --markdown > docs/options.md`; do not edit by hand.",
        f"Every option behaves as `model.generate` does in transformers {MATCHED_TRANSFORMERS}, "
        "the locked release (`requirements/*.lock`; `GET /info` reports it as "
        "`generate_matches_transformers`).",
        "Classes as in the generate-options contract (A in the batched engine, B served one "
        "request at a time between batch steps, "
        "C exact slow lane, D engine-owned, E not applicable, F HTTP forms of Python-only "
        "arguments, API the server's own). Status: served, accepted-ignored (no effect on "
        "output), rejected-422, not-yet (422 until served). Rejected and not-yet options "
        "are accepted at their neutral value. See docs/api.md.",
        "",
        "| option | class | type | range | default | status | via | neutral | notes | tests |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in _ROWS:
        neutral = ", ".join(repr(v) for v in r.neutral) if r.neutral else "-"
        tests = "<br>".join(f"`{t}`" for t in r.tests)
        cells = [f"`{r.name}`", r.cls, f"`{r.type}`", r.range, r.default, r.status, r.via,
                 neutral, r.note or "-", tests]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m app.api.option_table --markdown > docs/options.md")
    sys.stdout.write(markdown())
