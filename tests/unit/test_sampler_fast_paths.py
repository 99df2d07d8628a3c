"""The sampler's fast paths give the same bits as the transformers / torch code they replace."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from app.engine.sample.logits_warpers import _top_p, _top_p_short
from app.engine.sample.seeded_draw import (
    NoiseFills,
    gumbel_argmax,
    invalid_codes,
    multinomial_error,
)


@pytest.mark.parametrize("vocab", [51200, 3262, 777])
@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_short_top_p_after_top_k_equals_transformers(vocab: int, top_k: int) -> None:
    gen = torch.Generator().manual_seed(vocab + top_k)
    used_short = 0
    for top_p in (0.1, 0.5, 0.92, 0.999):
        for scale in (0.5, 3.0, 10.0):
            scores = TopKLogitsWarper(top_k)(None, torch.randn(4, vocab, generator=gen) * scale)
            expected = TopPLogitsWarper(top_p)(None, scores.clone())
            used_short += _top_p_short(scores.clone(), [top_p] * 4) is not None
            assert torch.equal(_top_p(scores.clone(), [top_p] * 4), expected)
    assert used_short == 12  # every case above takes the short path


def test_ties_and_infinities_take_the_full_sort() -> None:
    gen = torch.Generator().manual_seed(0)
    tied = TopKLogitsWarper(40)(None, torch.round(torch.randn(3, 3262, generator=gen) * 2) / 2)
    assert _top_p_short(tied.clone(), [0.6] * 3) is None
    assert torch.equal(_top_p(tied.clone(), [0.6] * 3), TopPLogitsWarper(0.6)(None, tied.clone()))
    plus_inf = TopKLogitsWarper(5)(None, torch.randn(2, 500, generator=gen))
    plus_inf[0, 7] = float("inf")
    assert _top_p_short(plus_inf, [0.9] * 2) is None


def test_per_row_top_p_values() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = TopKLogitsWarper(30)(None, torch.randn(3, 2000, generator=gen) * 2)
    got = _top_p(scores.clone(), [0.3, 0.8, 0.95])
    for i, p in enumerate([0.3, 0.8, 0.95]):
        assert torch.equal(got[i : i + 1], TopPLogitsWarper(p)(None, scores[i : i + 1].clone()))


def draw_seeded(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` [n, V], row j drawn with `generators[j]`: the sampler's
    seeded draw (its validity codes, noise fills and Gumbel argmax) on its own."""
    refused = [code for code in invalid_codes(probs).tolist() if code]
    if refused:  # multinomial's error for the first refused row
        raise multinomial_error(refused[0])
    fills = NoiseFills(generators, None, probs.shape[-1], probs.device)
    return gumbel_argmax(probs, fills.rows(range(len(generators))))


def test_seeded_draws_equal_multinomial_per_row() -> None:
    probs = torch.softmax(torch.randn(6, 3262, generator=torch.Generator().manual_seed(2)), -1)
    seeds = [11, 12, 13, 11, 99, 5]
    ours = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(5):  # several steps: the generators must advance exactly as multinomial's
        tokens = draw_seeded(probs, ours).tolist()
        expected = [
            int(torch.multinomial(probs[j : j + 1], 1, generator=g)[0, 0])
            for j, g in enumerate(theirs)
        ]
        assert tokens == expected
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.get_state(), b.get_state())


def test_invalid_probabilities_fail_like_multinomial() -> None:
    probs = torch.softmax(torch.randn(2, 50), -1)
    probs[1, 3] = float("nan")
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    with pytest.raises(RuntimeError, match="probability tensor"):
        draw_seeded(probs, gens)


def test_rows_sharing_a_generator_draw_like_one_batched_multinomial() -> None:
    """A request's n > 1 siblings share one generator: one batched draw, as generate does."""
    probs = torch.softmax(torch.randn(5, 900, generator=torch.Generator().manual_seed(3)), -1)
    shared, other = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    tokens = draw_seeded(probs, [shared, shared, other, shared, other]).tolist()
    ref_shared = torch.multinomial(probs[[0, 1, 3]], 1, generator=torch.Generator().manual_seed(7))
    ref_other = torch.multinomial(probs[[2, 4]], 1, generator=torch.Generator().manual_seed(8))
    assert [tokens[0], tokens[1], tokens[3]] == ref_shared[:, 0].tolist()
    assert [tokens[2], tokens[4]] == ref_other[:, 0].tolist()
