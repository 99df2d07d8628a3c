"""Constrained beam search: every forced word (a phrase, or one of several alternatives)
appears in the output; the constraint bookkeeping follows transformers 4.x."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import GPT2LMHeadModel

from app.engine.lanes.class_b.constraints import (
    ConstraintListState,
    DisjunctiveConstraint,
    PhrasalConstraint,
)
from app.engine.lanes.class_b.runner import run_method
from tests.unit.class_b_helpers import class_b_params

PROMPT = [5, 9, 14, 22, 9]


@pytest.fixture(scope="module")
def model(peaky_model: GPT2LMHeadModel, one_thread: None) -> Iterator[GPT2LMHeadModel]:
    yield peaky_model


def contains(sequence: list[int], phrase: list[int]) -> bool:
    n = len(phrase)
    return any(sequence[i : i + n] == phrase for i in range(len(sequence) - n + 1))


@pytest.mark.parametrize(
    "force_words_ids",
    [
        [[40, 41], [77]],  # a two-token phrase and a word
        [[[120], [130, 131]], [7]],  # one of two alternatives, and a word
        [[200, 201, 202]],
    ],
)
def test_every_forced_word_appears(model: GPT2LMHeadModel, force_words_ids: list) -> None:
    params = class_b_params(
        model, len(PROMPT), force_words_ids=force_words_ids, num_beams=4, max_new_tokens=12
    )
    [(tokens, score)] = run_method(model, PROMPT, params)
    assert score < 0
    for word in force_words_ids:
        alternatives = word if isinstance(word[0], list) else [word]
        assert any(contains(tokens, a) for a in alternatives), (word, tokens)


def test_forced_words_change_plain_beam_search(model: GPT2LMHeadModel) -> None:
    ids = torch.tensor([PROMPT])
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=4, max_new_tokens=12)
    plain_tokens = plain[0, len(PROMPT) :].tolist()
    assert not contains(plain_tokens, [40, 41])  # so the constraint has work to do
    params = class_b_params(
        model, len(PROMPT), force_words_ids=[[40, 41]], num_beams=4, max_new_tokens=12
    )
    assert contains(run_method(model, PROMPT, params)[0][0], [40, 41])


def test_phrasal_progress_resets_when_broken() -> None:
    def state_after(tokens: list[int]) -> ConstraintListState:
        state = ConstraintListState([PhrasalConstraint([3, 4, 5])])
        state.reset(tokens)
        return state

    assert not state_after([3, 4]).completed and state_after([3, 4]).get_bank() == 2
    assert state_after([3, 4]).advance() == [5]
    assert state_after([3, 4, 9, 3, 4, 5]).completed
    assert state_after([3, 4, 9, 3, 4, 5]).get_bank() == 3
    # as 4.x: the token that breaks a phrase is not offered to restart it
    assert not state_after([3, 3, 4, 5]).completed
    assert state_after([3, 3, 4, 5]).advance() == [3]


def test_disjunctive_completes_on_any_alternative() -> None:
    for sequence in ([1, 2], [7], [0, 7, 0]):
        state = ConstraintListState([DisjunctiveConstraint([[1, 2], [7]])])
        state.reset(sequence)
        assert state.completed, sequence
    state = ConstraintListState([DisjunctiveConstraint([[1, 2], [7]]), PhrasalConstraint([9])])
    assert sorted(state.advance() or []) == [1, 7, 9]
    state.reset([1])
    assert state.advance() == [2] and not state.completed


def test_an_alternative_may_not_prefix_another() -> None:
    with pytest.raises(ValueError, match="subset"):
        DisjunctiveConstraint([[1, 2], [1]])
