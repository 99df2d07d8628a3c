"""Group (diverse) beam search: groups take turns within a step, each penalized for the
tokens earlier groups chose at that step (Hamming diversity), so the groups differ."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import (
    GPT2LMHeadModel,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from app.engine.lanes.class_b.group_beam import HammingDiversityLogitsProcessor, with_diversity
from app.engine.lanes.class_b.runner import run_method
from app.options.class_b import GROUP_BEAM, ClassBOptions
from tests.unit.class_b_helpers import class_b_params, unchecked

PROMPT = [5, 9, 14, 22, 9]


@pytest.fixture(scope="module")
def model(peaky_model: GPT2LMHeadModel, one_thread: None) -> Iterator[GPT2LMHeadModel]:
    yield peaky_model


def test_penalty_subtracts_earlier_groups_tokens() -> None:
    hamming = HammingDiversityLogitsProcessor(0.5, num_beams=6, num_beam_groups=3)
    scores = torch.zeros(2, 10)
    current = torch.tensor([4, 4, 7, 1, 0, 0])  # this step's picks of groups 0 and 1
    assert torch.equal(hamming(None, scores, current, 0), scores)  # type: ignore[arg-type]
    group1 = hamming(None, scores, current, 1)  # type: ignore[arg-type]
    assert group1[:, 4].tolist() == [-1.0, -1.0] and group1.sum() == -2.0
    group2 = hamming(None, scores, current, 2)  # type: ignore[arg-type]
    expected = torch.zeros(10)
    expected[[4, 7, 1]] = torch.tensor([-1.0, -0.5, -0.5])
    assert torch.equal(group2[0], expected) and torch.equal(group2[1], expected)


def test_diversity_goes_after_sequence_bias_and_before_penalties() -> None:
    bias = SequenceBiasLogitsProcessor({(3,): 1.0})
    repetition = RepetitionPenaltyLogitsProcessor(1.2)
    hamming = HammingDiversityLogitsProcessor(0.5, 4, 2)
    ordered = with_diversity(LogitsProcessorList([bias, repetition]), hamming)
    assert list(ordered) == [bias, hamming, repetition]
    assert list(with_diversity(LogitsProcessorList([repetition]), hamming)) == [hamming, repetition]


def test_groups_differ(model: GPT2LMHeadModel) -> None:
    """One beam per group and a large penalty: at every step each group picks a token no
    earlier group picked, so the returned sequences differ at every position."""
    params = class_b_params(
        model,
        len(PROMPT),
        num_beams=3,
        num_beam_groups=3,
        diversity_penalty=1000.0,
        num_return_sequences=3,
        max_new_tokens=8,
        eos_token_id=None,
    )
    results = run_method(model, PROMPT, params)
    sequences = [tokens for tokens, _ in results]
    assert len(sequences) == 3 and all(len(s) == 8 for s in sequences)
    for position in range(8):
        assert len({s[position] for s in sequences}) == 3, sequences
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)


def test_without_penalty_groups_repeat_each_other(model: GPT2LMHeadModel) -> None:
    """The penalty is what makes them differ: at 1e-9 every group follows the same path."""
    params = class_b_params(
        model,
        len(PROMPT),
        num_beams=3,
        num_beam_groups=3,
        diversity_penalty=1e-9,
        num_return_sequences=3,
        max_new_tokens=8,
        eos_token_id=None,
    )
    sequences = [tokens for tokens, _ in run_method(model, PROMPT, params)]
    assert sequences[0] == sequences[1] == sequences[2]


def test_one_group_is_beam_search(model: GPT2LMHeadModel) -> None:
    """With a single group the method is plain beam search: transformers 5's model.generate
    gives the same sequences and scores."""
    options = {"num_beams": 4, "num_return_sequences": 4, "max_new_tokens": 10}
    method = ClassBOptions(GROUP_BEAM, num_beam_groups=1, diversity_penalty=0.5)
    results = run_method(model, PROMPT, unchecked(model, len(PROMPT), method, **options))
    ids = torch.tensor([PROMPT])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), output_scores=True,
        return_dict_in_generate=True, **options,
    )  # fmt: skip
    eos = model.generation_config.eos_token_id
    rows = out.sequences[:, len(PROMPT) :].tolist()
    rows = [r[: r.index(eos) + 1] if eos in r else r for r in rows]
    assert [tokens for tokens, _ in results] == rows
    assert [s for _, s in results] == pytest.approx(out.sequences_scores.tolist(), rel=1e-6)
