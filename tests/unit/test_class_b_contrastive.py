"""Contrastive search picks, among the top_k candidates, the one with the best model
confidence minus degeneration penalty (Su et al. 2022), recomputed here from scratch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import GPT2LMHeadModel

from app.engine.lanes.class_b.runner import run_method
from app.options.class_b import CONTRASTIVE, ClassBOptions
from tests.unit.class_b_helpers import class_b_params, unchecked

PROMPT = [5, 9, 14, 22, 9]


@pytest.fixture(scope="module")
def model(tiny_model: GPT2LMHeadModel, one_thread: None) -> Iterator[GPT2LMHeadModel]:
    yield tiny_model


def last_hidden(model: GPT2LMHeadModel, ids: list[int]) -> torch.Tensor:
    """Last-layer hidden states [len, H] of a fresh, cache-free forward."""
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]


def by_definition(model: GPT2LMHeadModel, alpha: float, k: int, steps: int) -> list[int]:
    """argmax over the top-k v of (1 - alpha) p(v) - alpha max_j cos(h_v, h_j)."""
    ids = list(PROMPT)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        top_p, top_ids = torch.topk(torch.softmax(logits, dim=-1), k)
        context = last_hidden(model, ids)
        scores = []
        for p, v in zip(top_p.tolist(), top_ids.tolist(), strict=True):
            h = last_hidden(model, [*ids, v])[-1]
            penalty = max(torch.cosine_similarity(h, c, dim=0).item() for c in context)
            scores.append((1 - alpha) * p - alpha * penalty)
        ids.append(top_ids[scores.index(max(scores))].item())
    return ids[len(PROMPT) :]


@pytest.mark.parametrize(("alpha", "k"), [(0.6, 4), (0.9, 3), (0.3, 8)])
def test_picks_by_the_degeneration_penalty(model: GPT2LMHeadModel, alpha: float, k: int) -> None:
    params = class_b_params(model, len(PROMPT), penalty_alpha=alpha, top_k=k, max_new_tokens=8)
    [(tokens, _)] = run_method(model, PROMPT, params)
    assert tokens == by_definition(model, alpha, k, 8)


def test_penalty_changes_the_choice(model: GPT2LMHeadModel) -> None:
    """Without the penalty it is greedy search; a strong penalty leaves the greedy path."""
    greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False)
    greedy_tokens = greedy[0, len(PROMPT) :].tolist()
    zero = unchecked(
        model, len(PROMPT), ClassBOptions(CONTRASTIVE, penalty_alpha=0.0), top_k=4, max_new_tokens=8
    )
    assert run_method(model, PROMPT, zero)[0][0] == greedy_tokens
    strong = class_b_params(model, len(PROMPT), penalty_alpha=0.9, top_k=4, max_new_tokens=8)
    assert run_method(model, PROMPT, strong)[0][0] != greedy_tokens
