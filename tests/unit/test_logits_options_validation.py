"""Validation of the logits options: each invalid value is a ParamValidationError (a 422)
naming the field and the allowed range, with HF's rules (see app/options/logits.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from transformers.generation import WatermarkingConfig

from app.options.checks import ParamValidationError
from app.options.resolve import resolve_sampling_params

N_POS, VOCAB, EOS = 128, 300, 1

BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"repetition_penalty": math.inf}, "repetition_penalty", "finite"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size", ">= 0"),
    ({"no_repeat_ngram_size": 1.5}, "no_repeat_ngram_size", "integer"),
    ({"bad_words_ids": []}, "bad_words_ids", "non-empty"),
    ({"bad_words_ids": [[]]}, "bad_words_ids", "non-empty"),
    ({"bad_words_ids": [[1, -2]]}, "bad_words_ids", ">= 0"),
    ({"bad_words_ids": [[VOCAB]]}, "bad_words_ids", f"< {VOCAB}"),
    ({"bad_words_ids": [3]}, "bad_words_ids", "list"),
    ({"bad_words": [""]}, "bad_words", ">= 1 token"),
    ({"bad_words": 5}, "bad_words", "string"),
    ({"sequence_bias": []}, "sequence_bias", "non-empty"),
    ({"sequence_bias": [[[1], math.nan]]}, "sequence_bias", "finite"),
    ({"sequence_bias": [[[], 1.0]]}, "sequence_bias", "non-empty"),
    ({"sequence_bias": [[[1, VOCAB + 5], 1.0]]}, "sequence_bias", f"< {VOCAB}"),
    ({"sequence_bias": [[1, 2.0, 3]]}, "sequence_bias", "pairs"),
    ({"suppress_tokens": [-1]}, "suppress_tokens", ">= 0"),
    ({"suppress_tokens": 5}, "suppress_tokens", "list"),
    ({"begin_suppress_tokens": [VOCAB]}, "begin_suppress_tokens", f"< {VOCAB}"),
    ({"forced_bos_token_id": -1}, "forced_bos_token_id", ">= 0"),
    ({"forced_bos_token_id": VOCAB}, "forced_bos_token_id", f"< {VOCAB}"),
    ({"forced_eos_token_id": []}, "forced_eos_token_id", "non-empty"),
    ({"forced_eos_token_id": [2, "x"]}, "forced_eos_token_id", ">= 0"),
    ({"forced_eos_token_id": [7], "suppress_tokens": [7, 8]}, "forced_eos_token_id", "suppress"),
    ({"forced_bos_token_id": 7, "suppress_tokens": [7]}, "forced_bos_token_id", "suppress"),
    ({"exponential_decay_length_penalty": [3]}, "exponential_decay_length_penalty", "pair"),
    ({"exponential_decay_length_penalty": [-1, 1.5]}, "exponential_decay_length_penalty", ">= 0"),
    ({"exponential_decay_length_penalty": [1, 0.0]}, "exponential_decay_length_penalty", "> 0"),
    (
        {"exponential_decay_length_penalty": [0, 1e20]},
        "exponential_decay_length_penalty",
        "overflow",
    ),
    (
        {"exponential_decay_length_penalty": [1, 1.5], "ignore_eos": True},
        "exponential_decay_length_penalty",
        "eos_token_id",
    ),
    ({"min_p": 1.5}, "min_p", "[0, 1]"),
    ({"min_p": -0.1}, "min_p", "[0, 1]"),
    ({"typical_p": 0.0}, "typical_p", "(0, 1]"),
    ({"typical_p": 1.2}, "typical_p", "(0, 1]"),
    ({"epsilon_cutoff": 1.0}, "epsilon_cutoff", "[0, 1)"),
    ({"epsilon_cutoff": -0.1}, "epsilon_cutoff", "[0, 1)"),
    ({"eta_cutoff": 1.0}, "eta_cutoff", "[0, 1)"),
    ({"eta_cutoff": math.nan}, "eta_cutoff", "finite"),
    ({"top_h": 0.0}, "top_h", "(0, 1]"),
    ({"top_h": 2}, "top_h", "(0, 1]"),
    ({"renormalize_logits": "yes"}, "renormalize_logits", "true or false"),
    ({"remove_invalid_values": 1}, "remove_invalid_values", "true or false"),
    ({"watermarking_config": {"greenlist_ratio": 1.0}}, "watermarking_config", "(0, 1)"),
    ({"watermarking_config": {"seeding_scheme": "x"}}, "watermarking_config", "lefthash"),
    ({"watermarking_config": {"context_width": 0}}, "watermarking_config", ">= 1"),
    ({"watermarking_config": {"colour": 1}}, "watermarking_config", "unknown"),
    ({"watermarking_config": 3}, "watermarking_config", "object"),
    ({"watermarking_config": {"hashing_key": 2**64}}, "watermarking_config", "2**64 - 1"),
    ({"top_n_tokens": 21}, "top_n_tokens", "[0, 20]"),
    ({"top_n_tokens": -1}, "top_n_tokens", "[0, 20]"),
]


@pytest.mark.parametrize(("options", "name", "words"), BAD, ids=[b[1] for b in BAD])
def test_invalid_values_name_the_field(options: dict[str, Any], name: str, words: str) -> None:
    with pytest.raises(ParamValidationError) as err:
        resolve_sampling_params(
            options, {"eos_token_id": EOS}, N_POS, 10, encode=lambda s: [], vocab_size=VOCAB
        )
    assert err.value.field == name
    assert name in str(err.value) and words in str(err.value)


def test_bad_words_need_a_tokenizer() -> None:
    with pytest.raises(ParamValidationError) as err:
        resolve_sampling_params({"bad_words": ["x"]}, {}, N_POS, 3)
    assert err.value.field == "bad_words" and "tokenizer" in err.value.message


def test_options_resolve_like_generate() -> None:
    p = resolve_sampling_params({}, {}, N_POS, 3)
    assert (p.repetition_penalty, p.no_repeat_ngram_size, p.typical_p) == (1.0, 0, 1.0)
    assert (p.epsilon_cutoff, p.eta_cutoff, p.min_p, p.top_h, p.top_n_tokens) == (
        0,
        0,
        None,
        None,
        0,
    )
    ckpt = {"repetition_penalty": 1.2, "suppress_tokens": [3], "bad_words_ids": [[4]]}
    p = resolve_sampling_params({"suppress_tokens": []}, ckpt, N_POS, 3)  # [] clears it
    assert (p.repetition_penalty, p.suppress_tokens, p.bad_words_ids) == (1.2, None, [[4]])
    p = resolve_sampling_params(
        {"sequence_bias": {(1, 2): 1, (3,): -2.5}, "exponential_decay_length_penalty": [2, 2]},
        {"eos_token_id": EOS},
        N_POS,
        3,
    )
    assert p.sequence_bias == [[[1, 2], 1.0], [[3], -2.5]]
    assert p.exponential_decay_length_penalty == (2, 2.0)
    wm = resolve_sampling_params({"watermarking_config": {"bias": 1}}, {}, N_POS, 3)
    assert wm.watermarking_config == {**WatermarkingConfig().to_dict(), "bias": 1.0}
