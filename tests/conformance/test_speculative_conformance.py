"""Prompt-lookup decoding on the embedded model in float64: with prompt_lookup_num_tokens the
engine's output equals the same request without it, and `model.generate` without it, for
greedy and seeded sampling with logits options, alone and in a busy batch; on a prompt the
model copies from, drafts are accepted and the engine takes fewer steps."""

from __future__ import annotations

from typing import Any

import pytest

from app.engine.engine import LLMEngine
from app.modeling.loader import LoadedModel
from tests.conformance.conftest import encode, engine_run, hf_generate, padded

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 3
LOOKUP = {"prompt_lookup_num_tokens": 6}
START = "제10조 모든 국민은"
PLAIN_PROMPT = "국회는 국민의"
BUSY = ["대한민국은", "법률", "제1조 대한민국은 민주공화국이다. 모든 권력은"]


@pytest.fixture(scope="module")
def copying(embedded64: LoadedModel) -> str:
    """The model's own greedy continuation of START, then START again: the model repeats
    much of it, and prompt lookup finds those tokens in the prompt."""
    (got,), _ = run_engine(embedded64, [(encode(embedded64, START), {"max_new_tokens": 40})])
    return START + embedded64.tokenizer.decode(got[0]) + "\n" + START


def run_engine(
    loaded: LoadedModel, jobs: list[tuple[list[int], dict[str, Any]]], budget: int = 64
) -> tuple[list[dict[int, list[int]]], LLMEngine]:
    """All jobs in one engine; generated ids per sequence per job, and the engine."""
    return engine_run(loaded, jobs, num_blocks=256, max_num_batched_tokens=budget)


def check_identical(loaded: LoadedModel, text: str, options: dict[str, Any]) -> LLMEngine:
    """Alone and in a busy batch (neighbours with and without prompt lookup), the output with
    prompt lookup equals generate's without it. Returns the engine of the run alone."""
    prompt = encode(loaded, text)
    ref = hf_generate(loaded, prompt, {k: v for k, v in options.items() if k in HF_OPTIONS})
    with_lookup = {**options, **LOOKUP}
    alone, engine = run_engine(loaded, [(prompt, with_lookup)])
    assert padded(alone[0], ref, PAD) == ref, f"alone: {options}"
    busy = [
        (encode(loaded, p), {"max_new_tokens": 14, "do_sample": True, "seed": i, **LOOKUP})
        if i % 2
        else (encode(loaded, p), {"max_new_tokens": 14})
        for i, p in enumerate(BUSY)
    ]
    mixed, _ = run_engine(loaded, [busy[0], (prompt, with_lookup), *busy[1:]], budget=24)
    assert padded(mixed[1], ref, PAD) == ref, f"in a busy batch: {options}"
    return engine


GREEDY = {"max_new_tokens": 24}
SEEDED = {"max_new_tokens": 24, "do_sample": True, "seed": 7, "top_k": 20}
CASES: list[dict[str, Any]] = [
    GREEDY,
    SEEDED,
    {**GREEDY, "do_sample": True, "seed": 11, "top_p": 0.9, "temperature": 0.8},
    {**GREEDY, "repetition_penalty": 1.3},
    {**GREEDY, "no_repeat_ngram_size": 3},
    {**GREEDY, "do_sample": True, "seed": 5, "no_repeat_ngram_size": 2, "top_k": 8},
    {**GREEDY, "do_sample": True, "seed": 3, "repetition_penalty": 1.2, "min_p": 0.05},
    {**GREEDY, "min_new_tokens": 20, "eos_token_id": [1, 8]},
    {**GREEDY, "top_n_tokens": 2, "max_matching_ngram_size": 1},
    {**GREEDY, "max_matching_ngram_size": 4, "sequence_bias": [[[10], 2.0]]},
]
HF_OPTIONS = set().union(*CASES) - {"top_n_tokens", "max_matching_ngram_size"}


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(o))
def test_prompt_lookup_output_equals_generate(
    embedded64, copying: str, options: dict[str, Any]
) -> None:
    check_identical(embedded64, copying, options)


@pytest.mark.parametrize("options", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prompt_without_matches_equals_generate(embedded64, options: dict[str, Any]) -> None:
    check_identical(embedded64, PLAIN_PROMPT, options)


def test_drafts_are_accepted_and_save_steps(embedded64, copying: str) -> None:
    prompt = encode(embedded64, copying)
    options = {"max_new_tokens": 40}
    plain, plain_engine = run_engine(embedded64, [(prompt, options)])
    spec, engine = run_engine(embedded64, [(prompt, {**options, **LOOKUP})])
    assert spec == plain and len(plain[0][0]) == 40
    stats = engine.stats()
    assert stats["spec_draft_tokens"] >= stats["spec_accepted_tokens"] > 10
    assert plain_engine.stats()["spec_draft_tokens"] == 0
    assert engine.num_steps < plain_engine.num_steps - 10


def test_ngram_size_and_draft_length_change_only_the_speed(embedded64, copying: str) -> None:
    prompt = encode(embedded64, copying)
    base = {"max_new_tokens": 24, "do_sample": True, "seed": 1, "top_k": 5}
    ref, _ = run_engine(embedded64, [(prompt, base)])
    for extra in ({"max_matching_ngram_size": 1}, {"max_matching_ngram_size": 3}):
        for num in (1, 3, 50):
            got, _ = run_engine(
                embedded64, [(prompt, {**base, **extra, "prompt_lookup_num_tokens": num})]
            )
            assert got == ref, (extra, num)


@pytest.mark.parametrize("stop", ["length", "stop_string", "eos"])
def test_stops_where_plain_decoding_stops(embedded64, copying: str, stop: str) -> None:
    """The stop falls among accepted drafts: generation ends exactly where plain decoding's
    does (the stop string and the eos are taken from the plain output's 12th token)."""
    prompt = encode(embedded64, copying)
    (plain,), _ = run_engine(embedded64, [(prompt, {"max_new_tokens": 40})])
    options: dict[str, Any] = {"max_new_tokens": 40}
    if stop == "length":
        options["max_new_tokens"] = 9
    elif stop == "stop_string":
        options["stop_strings"] = [embedded64.tokenizer.decode(plain[0][10:12]).strip()]
    else:
        options["eos_token_id"] = plain[0][11]
    ref = hf_generate(embedded64, prompt, options)
    assert len(ref[0]) < 40
    got, engine = run_engine(embedded64, [(prompt, {**options, **LOOKUP})])
    assert got[0][0] == ref[0]
    assert engine.stats()["spec_accepted_tokens"] > 0


@pytest.mark.parametrize(
    "options",
    [
        {"max_new_tokens": 12, "num_beams": 3},
        {"max_new_tokens": 12, "do_sample": True, "seed": 4, "num_return_sequences": 2},
        {"max_new_tokens": 12, "guidance_scale": 1.5},
    ],
    ids=["beams", "n2", "guidance"],
)
def test_multi_sequence_requests_decode_plainly(
    embedded64, copying: str, options: dict[str, Any]
) -> None:
    prompt = encode(embedded64, copying)
    ref = hf_generate(embedded64, prompt, options)
    got, engine = run_engine(embedded64, [(prompt, {**options, **LOOKUP})])
    assert padded(got[0], ref, PAD) == ref
    assert engine.stats()["spec_draft_tokens"] == 0
