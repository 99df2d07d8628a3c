"""Conformance: every class-A option, alone and mixed into a busy batch, equals
`torch.manual_seed(s); model.generate(...)` on the embedded model in float64."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conformance.conftest import encode, engine_generate, hf_generate, padded

PAD = 3
PROMPTS = ["대한민국은", "국회는 국민의", "제1조 대한민국은 민주공화국이다. 모든 권력은", "법률"]

# The lecture notes' examples (GPT-2 decoding comparison), then one case per option.
SEED_EXAMPLES: list[dict[str, Any]] = [
    {"max_new_tokens": 20},
    {
        "max_new_tokens": 20,
        "num_beams": 5,
        "no_repeat_ngram_size": 2,
        "num_return_sequences": 5,
        "early_stopping": True,
    },
    {"max_new_tokens": 20, "do_sample": True, "top_k": 0, "temperature": 0.7, "seed": 42},
    {
        "max_new_tokens": 20,
        "do_sample": True,
        "top_k": 50,
        "top_p": 0.92,
        "num_return_sequences": 3,
        "seed": 42,
    },
    {"max_new_tokens": 20, "bad_words_ids": [[5], [300, 301]]},
    {"max_new_tokens": 20, "eos_token_id": 7},
    {"max_length": 18},
]
OPTION_CASES: list[dict[str, Any]] = [
    {"min_new_tokens": 10, "max_new_tokens": 14},
    {"min_length": 12},
    {"repetition_penalty": 1.3},
    {"no_repeat_ngram_size": 3},
    {"sequence_bias": [[[10], 5.0], [[20, 21], -3.0]]},
    {"suppress_tokens": [10, 11, 12]},
    {"begin_suppress_tokens": [10]},
    {"forced_eos_token_id": 1},
    {"exponential_decay_length_penalty": [5, 1.5]},
    {"renormalize_logits": True, "do_sample": True, "seed": 1},
    {"remove_invalid_values": True},
    {"do_sample": True, "min_p": 0.1, "seed": 2},
    {"do_sample": True, "typical_p": 0.8, "seed": 3},
    {"do_sample": True, "epsilon_cutoff": 0.001, "seed": 4},
    {"do_sample": True, "eta_cutoff": 0.001, "seed": 5},
    {"do_sample": True, "top_h": 0.5, "seed": 6},
    {"num_beams": 3, "length_penalty": 2.0, "early_stopping": "never"},
    {"num_beams": 3, "do_sample": True, "seed": 8},
    {"stop_strings": ["다."]},
    {"eos_token_id": [1, 8]},
    {"pad_token_id": 0},
    {"guidance_scale": 1.5},
    {"guidance_scale": 2.0, "do_sample": True, "seed": 3},
    {"max_time": 60.0},
]


def check_alone_and_busy(loaded, prompt_text: str, options: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    options = {"max_new_tokens": 12, **options} if "max_length" not in options else options
    prompt = encode(loaded, prompt_text)
    ref = hf_generate(loaded, prompt, options)
    busy = [
        (encode(loaded, p), {"max_new_tokens": 16, "do_sample": True, "seed": i, "top_k": 20})
        for i, p in enumerate(PROMPTS)
    ]
    alone = engine_generate(loaded, [(prompt, options)])[0]
    assert padded(alone, ref, PAD) == ref, f"alone: {options}"
    mixed = engine_generate(loaded, [busy[0], busy[1], (prompt, options), *busy[2:]])
    assert padded(mixed[2], ref, PAD) == ref, f"in a busy batch: {options}"


@pytest.mark.parametrize("options", SEED_EXAMPLES, ids=lambda o: ",".join(o))
def test_seed_examples(embedded64, options: dict[str, Any]) -> None:
    check_alone_and_busy(embedded64, PROMPTS[0], options)


@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: ",".join(o))
def test_each_option(embedded64, options: dict[str, Any]) -> None:
    check_alone_and_busy(embedded64, PROMPTS[2], options)


option_values = st.fixed_dictionaries(
    {},
    optional={
        "repetition_penalty": st.sampled_from([0.8, 1.2, 1.5]),
        "no_repeat_ngram_size": st.integers(1, 3),
        "temperature": st.sampled_from([0.5, 0.9, 1.3]),
        "top_k": st.sampled_from([0, 5, 50]),
        "top_p": st.sampled_from([0.5, 0.9, 1.0]),
        "min_new_tokens": st.integers(0, 6),
        "suppress_tokens": st.lists(st.integers(7, 400), min_size=1, max_size=3),
        "bad_words_ids": st.lists(
            st.lists(st.integers(7, 400), min_size=1, max_size=2), min_size=1, max_size=2
        ),
        "typical_p": st.sampled_from([0.5, 0.95]),
        "min_p": st.sampled_from([0.05, 0.2]),
    },
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    options=option_values,
    do_sample=st.booleans(),
    num_beams=st.sampled_from([1, 1, 2]),
    seed=st.integers(0, 2**16),
    prompt=st.sampled_from(PROMPTS),
)
def test_random_combinations(embedded64, options, do_sample, num_beams, seed, prompt) -> None:
    options = {
        **options,
        "do_sample": do_sample,
        "num_beams": num_beams,
        "seed": seed,
        "max_new_tokens": 8,
    }
    check_alone_and_busy(embedded64, prompt, options)


def test_guidance_with_negative_prompt(embedded64) -> None:
    """negative_prompt_ids: the unconditional sequence starts from the negative prompt."""
    import torch

    prompt, negative = encode(embedded64, PROMPTS[2]), encode(embedded64, "법률")
    options = {"guidance_scale": 1.8, "max_new_tokens": 12, "do_sample": True}
    torch.manual_seed(9)
    ids = torch.tensor([prompt])
    ref = embedded64.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        negative_prompt_ids=torch.tensor([negative]),
        **options,
    )[0, len(prompt) :].tolist()
    ours = {**options, "seed": 9, "negative_prompt_ids": negative}
    assert engine_generate(embedded64, [(prompt, ours)])[0][0] == ref
    busy = [(encode(embedded64, p), {"max_new_tokens": 10}) for p in PROMPTS]
    assert engine_generate(embedded64, [*busy, (prompt, ours)])[-1][0] == ref


@pytest.mark.parametrize("text", ["대한민국은 민주공화", "국회의"])
def test_token_healing(embedded64, text: str) -> None:
    """The healed prompt may change length: compare the new tokens after it."""
    import torch

    prompt = encode(embedded64, text)
    options = {"token_healing": True, "max_new_tokens": 10}
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        full = embedded64.model.generate(
            ids, attention_mask=torch.ones_like(ids), tokenizer=embedded64.tokenizer, **options
        )[0].tolist()
    busy = [(encode(embedded64, p), {"max_new_tokens": 10}) for p in PROMPTS]
    got = engine_generate(embedded64, [*busy, (prompt, options)])[-1][0]
    assert got == full[-len(got) :] and len(got) == 10
