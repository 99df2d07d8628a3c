"""Which tests cover each generate option (pytest node ids, file::function): the test side of
the option registry (app/options/registry.py). tests/unit/test_option_registry.py checks that
every option is covered and that every listed test exists."""

from __future__ import annotations

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
OT_SPLIT = "tests/unit/test_option_registry.py::test_split_options_by_class"
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


_PEN = "tests/unit/test_penalties.py::"
PEN_ENGINE, PEN_HAND = (
    _PEN + "test_engine_equals_the_reference_loop",
    _PEN + "test_hand_computed_values",
)
PEN_TGI = "tests/integration/test_tgi_semantics.py::test_frequency_penalty_on_tgi_routes"
PEN_OAI = "tests/integration/test_tgi_semantics.py::test_penalties_on_openai_routes"


_CB = "tests/unit/test_class_b_"
CB_REF = _CB + "reference.py::test_same_tokens_as_transformers_4"
CB_VALID = _CB + "options.py::test_invalid_values_name_field_and_range"
CB_HTTP = "tests/integration/test_class_b_http.py::test_each_method_over_generate_and_completions"


COVERAGE: dict[str, tuple[str, ...]] = {
    "max_length": (_SAMP + "test_explicit_max_length_counts_the_prompt", C_SEED),
    "max_new_tokens": (S_DEFAULTS, S_PREC),
    "min_length": (C_EACH, S_PREC),
    "min_new_tokens": (C_EACH, S_PREC),
    "max_time": (C_EACH, "tests/unit/test_engine.py::test_max_time_stops_generation"),
    "early_stopping": (C_SEED, C_EACH),
    "stop_strings": (C_EACH, _STOP + "test_stop_strings_match_hf_criteria_every_step"),
    "eos_token_id": (C_SEED, C_EACH, _STOP + "test_eos_int_and_list"),
    "pad_token_id": (C_EACH,),
    "bos_token_id": (OC_SAME,),
    "do_sample": (C_SEED, S_SINGLE),
    "num_beams": (C_SEED, C_EACH, _TGI + "test_beam_search_token_texts"),
    "num_return_sequences": (C_SEED, _OAI + "test_n_and_best_of"),
    "length_penalty": (C_EACH,),
    "use_cache": (OC_SAME,),
    "temperature": (C_SEED, S_VALID),
    "top_k": (C_SEED, S_SINGLE),
    "top_p": (C_SEED, S_SINGLE),
    "min_p": (L_SAMPLE, C_EACH),
    "typical_p": (L_SAMPLE, C_EACH),
    "epsilon_cutoff": (L_SAMPLE, C_EACH),
    "eta_cutoff": (L_SAMPLE, C_EACH),
    "top_h": (L_SAMPLE, C_EACH),
    "repetition_penalty": (L_GREEDY, C_EACH, L_VALID),
    "no_repeat_ngram_size": (L_GREEDY, C_EACH),
    "bad_words_ids": (L_GREEDY, C_SEED),
    "sequence_bias": (L_GREEDY, C_EACH, _OAI + "test_logit_bias_forces_a_token"),
    "suppress_tokens": (L_GREEDY, C_EACH),
    "begin_suppress_tokens": (L_GREEDY, C_EACH),
    "forced_bos_token_id": (_LOG + "test_forced_bos_on_a_one_token_prompt",),
    "forced_eos_token_id": (L_GREEDY, C_EACH),
    "exponential_decay_length_penalty": (L_GREEDY, C_EACH),
    "renormalize_logits": (L_GREEDY, C_EACH),
    "remove_invalid_values": (L_GREEDY, _LOG + "test_remove_invalid_values_on_non_finite_logits"),
    "guidance_scale": (C_EACH, C_GUIDE, OC_NEG),
    "watermarking_config": (L_GREEDY, OC_ALIASES, WM_DETECT),
    "token_healing": (C_HEAL,),
    "prompt_lookup_num_tokens": (SPEC_SAME, SPEC_FEWER, OC_LOOKUP),
    "max_matching_ngram_size": (
        SPEC_NGRAM,
        "tests/unit/test_ngram_proposer.py::test_matches_transformers",
    ),
    "output_scores": (OC_SCORES, OT_SPLIT),
    "output_logits": (OC_SCORES, OT_SPLIT),
    "return_dict_in_generate": (OC_SCORES, OT_SPLIT),
    "num_beam_groups": (CB_REF, _CB + "group_beam.py::test_groups_differ", CB_VALID, CB_HTTP),
    "diversity_penalty": (
        CB_REF,
        _CB + "group_beam.py::test_penalty_subtracts_earlier_groups_tokens",
        CB_VALID,
        CB_HTTP,
    ),
    "penalty_alpha": (
        CB_REF,
        _CB + "contrastive.py::test_picks_by_the_degeneration_penalty",
        CB_VALID,
        CB_HTTP,
    ),
    "dola_layers": (CB_REF, _CB + "dola.py::test_contrasts_the_chosen_layers", CB_VALID, CB_HTTP),
    "constraints": (
        CB_REF,
        _CB + "constrained_beam.py::test_every_forced_word_appears",
        CB_VALID,
        CB_HTTP,
    ),
    "force_words_ids": (
        CB_REF,
        _CB + "constrained_beam.py::test_every_forced_word_appears",
        CB_VALID,
        CB_HTTP,
    ),
    "output_attentions": (*OC_EXACT, OT_SPLIT),
    "output_hidden_states": (*OC_EXACT, OT_SPLIT),
    "cache_implementation": (OC_SAME, OT_SPLIT),
    "cache_config": (OC_SAME, OT_SPLIT),
    "max_cache_len": (OC_SAME, OT_SPLIT),
    "compile_config": (OC_SAME, OT_SPLIT),
    "disable_compile": (OC_SAME, OT_SPLIT),
    "prefill_chunk_size": (OC_SAME, OT_SPLIT),
    "continuous_batching_config": (OC_SAME, OT_SPLIT),
    "low_memory": (OC_SAME, OT_SPLIT),
    "encoder_repetition_penalty": (OC_E, OT_SPLIT),
    "encoder_no_repeat_ngram_size": (OC_E, OT_SPLIT),
    "decoder_start_token_id": (OC_E, OT_SPLIT),
    "use_mtp": (OC_E, OT_SPLIT),
    "num_assistant_tokens": (SPEC_DRAFT, OC_E, OT_SPLIT),
    "num_assistant_tokens_schedule": (SPEC_DRAFT, OC_E, OT_SPLIT),
    "assistant_confidence_threshold": (SPEC_DRAFT, OC_E, OT_SPLIT),
    "assistant_lookbehind": (SPEC_DRAFT, OC_E, OT_SPLIT),
    "target_lookbehind": (SPEC_DRAFT, OC_E, OT_SPLIT),
    "assistant_early_exit": (SPEC_DRAFT, OC_E, OT_SPLIT),
    "assistant_ensemble_weight": (OC_E, OT_SPLIT),
    "is_assistant": (SPEC_DRAFT, OC_E, OT_SPLIT),
    "speculation_type": (SPEC_DRAFT, OC_E, OT_SPLIT),
    "negative_prompt_ids": (C_GUIDE, OC_NEG),
    "negative_prompt": (OC_NEG,),
    "allowed_token_ids": (G_ENGINE, _GH + "test_allowed_token_ids"),
    "grammar": (G_ENGINE, _GH + "test_generate_json_and_regex", G_INVALID),
    "seed": (
        "tests/integration/test_server_basics.py::test_seeded_sampling_is_reproducible",
        C_SEED,
    ),
    "stop": (OC_ALIASES,),
    "bad_words": (_LOG + "test_bad_words_strings_are_tokenized_without_specials",),
    "force_words": (_CB + "options.py::test_force_words_strings_are_tokenized", CB_HTTP),
    "ignore_eos": (_STOP + "test_ignore_eos_and_no_eos", _TGI + "test_stream_text_is_utf8_safe"),
    "top_n_tokens": (L_GREEDY, _OAI + "test_logprobs_and_echo"),
    "input_ids": (T_DETAILS,),
    "details": (T_DETAILS, "tests/integration/test_server_basics.py::test_generate_details"),
    "decoder_input_details": (T_DETAILS,),
    "return_full_text": (T_DETAILS,),
    "truncate": (T_DETAILS,),
    "best_of": (_TGI + "test_best_of",),
    "watermark": (OC_ALIASES,),
    "frequency_penalty": (PEN_ENGINE, PEN_HAND, PEN_TGI),
    "presence_penalty": (PEN_ENGINE, PEN_HAND, PEN_OAI),
    "adapter_id": (OC_B, "tests/integration/test_lora_http.py::test_adapter_id_on_tgi_routes"),
}
