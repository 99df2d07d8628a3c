"""propose_ngram follows transformers' PromptLookupCandidateGenerator token for token."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from app.engine.spec.ngram_proposer import propose_ngram


def hf_candidates(
    tokens: list[int], num: int, ngram: int, max_length: int, eos: list[int]
) -> list[int]:
    generator = PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor(eos) if eos else None,
        num_output_tokens=num,
        max_matching_ngram_size=ngram,
        max_length=max_length,
    )
    out, _ = generator.get_candidates(torch.tensor([tokens]))
    return out[0, len(tokens) :].tolist()


def test_last_bigram_first_match_and_continuation() -> None:
    tokens = [5, 6, 7, 8, 5, 6, 9, 9, 5, 6]
    assert propose_ngram(tokens, 3, 2) == [7, 8, 5]  # the first (leftmost) match wins
    assert propose_ngram(tokens, 3, 2, eos_token_ids={8}) == [7]
    assert propose_ngram([1, 2, 3], 3, 2) == []  # no earlier occurrence
    assert propose_ngram([4, 1, 2, 4], 2, 3) == [1, 2]  # falls back to a 1-gram
    assert propose_ngram(tokens, 3, 2, max_length=11) == []  # one token left: no drafts


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    tokens=st.lists(st.integers(0, 5), min_size=2, max_size=30),
    num=st.integers(1, 8),
    ngram=st.integers(1, 4),
    extra=st.integers(1, 12),
    eos=st.lists(st.integers(0, 5), max_size=2),
)
def test_matches_transformers(
    tokens: list[int], num: int, ngram: int, extra: int, eos: list[int]
) -> None:
    max_length = len(tokens) + extra
    ours = propose_ngram(tokens, num, ngram, max_length, set(eos))
    assert ours == hf_candidates(tokens, num, ngram, max_length, eos)
