"""Draft-model speculative decoding on the embedded model in float64: the output equals plain
decoding (and `model.generate` without a draft) with a 2-layer truncated copy as the draft
and with the model itself; with itself and greedy decoding every draft is accepted, which
also checks that the draft's KV follows the target's through prefix-cache hits and
preemption."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from transformers import GPT2LMHeadModel

from app.engine.engine import LLMEngine
from app.engine.spec.draft_model import DraftModelError, check_compatible, check_same_tokenizer
from app.modeling.loader import LoadedModel
from tests.conformance.conftest import encode, engine_run, hf_generate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["제10조 모든 국민은", "국회는 국민의", "대한민국은"]
HF_KEYS = {"max_new_tokens", "do_sample", "seed", "top_k", "top_p", "repetition_penalty"}


@pytest.fixture(scope="module")
def two_layer(embedded64: LoadedModel) -> GPT2LMHeadModel:
    draft = copy.deepcopy(embedded64.model)
    draft.transformer.h = draft.transformer.h[:2]
    draft.config.n_layer = 2
    return draft


def run(
    loaded: LoadedModel,
    jobs: list[tuple[list[int], dict[str, Any]]],
    draft: GPT2LMHeadModel | None,
    num_blocks: int = 256,
) -> tuple[list[list[int]], LLMEngine]:
    """One-sequence jobs in one engine with `draft` proposing; ids per job, and the engine."""
    got, engine = engine_run(
        loaded,
        jobs,
        draft_model=draft,
        check_each_step=True,
        num_blocks=num_blocks,
        block_size=4,
        max_num_batched_tokens=48,
    )
    return [seqs.get(0, []) for seqs in got], engine


CASES: list[dict[str, Any]] = [
    {"max_new_tokens": 20},
    {"max_new_tokens": 20, "do_sample": True, "seed": 3, "top_k": 20},
    {"max_new_tokens": 20, "repetition_penalty": 1.2, "num_assistant_tokens": 4},
    {"max_new_tokens": 20, "num_assistant_tokens": 2, "num_assistant_tokens_schedule": "heuristic"},
    {"max_new_tokens": 20, "do_sample": True, "seed": 9, "assistant_confidence_threshold": 0.0},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(o))
def test_draft_model_output_equals_plain(
    embedded64: LoadedModel, two_layer: GPT2LMHeadModel, options: dict[str, Any]
) -> None:
    prompts = [encode(embedded64, p) for p in PROMPTS]
    hf_options = {k: v for k, v in options.items() if k in HF_KEYS}
    ref = hf_generate(embedded64, prompts[0], hf_options)[0]
    jobs = [(p, options) for p in prompts]
    plain, _ = run(embedded64, jobs, None)
    assert plain[0] == ref
    got, engine = run(embedded64, jobs, two_layer)
    assert got == plain
    assert engine.stats()["spec_draft_tokens"] > 0 and engine.num_steps < 20


def test_model_as_its_own_draft_accepts_every_draft(embedded64: LoadedModel) -> None:
    """Greedy with the model as its draft: a rejected draft means the draft's KV was wrong.
    Shared prefixes (prefix-cache hits) and a small pool (preemption) included."""
    shared = encode(embedded64, "제1조 ① 대한민국은 민주공화국이다. 대한민국의 주권은")
    jobs = [(shared + encode(embedded64, p), {"max_new_tokens": 24}) for p in PROMPTS]
    jobs += [
        (encode(embedded64, p), {"max_new_tokens": 24, "num_assistant_tokens": 6}) for p in PROMPTS
    ]
    plain, _ = run(embedded64, jobs, None, num_blocks=24)
    got, engine = run(embedded64, jobs, embedded64.model, num_blocks=24)
    assert got == plain
    stats = engine.stats()
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    assert stats["prefix_hits"] > 0 and stats["num_preemptions"] > 0


def test_incompatible_draft_is_refused_at_start(
    embedded64: LoadedModel, two_layer: GPT2LMHeadModel, tiny_model, tiny_tokenizer
) -> None:
    with pytest.raises(DraftModelError, match="vocab_size"):
        check_compatible(tiny_model, embedded64.model)
    with pytest.raises(DraftModelError, match="tokenizer"):
        check_same_tokenizer(tiny_tokenizer, embedded64.tokenizer)
    check_compatible(two_layer, embedded64.model)
    check_same_tokenizer(embedded64.tokenizer, embedded64.tokenizer)
