"""DoLa contrasts the final layer with the premature layer whose next-token distribution is
furthest from it (Jensen-Shannon), among the layers `dola_layers` names, and decodes from
log p_final - log p_premature over the final layer's relatively likely tokens."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from app.engine.lanes.class_b.common import TokenChoice
from app.engine.lanes.class_b.dola import candidate_layers, dola_decoding
from app.engine.lanes.class_b.runner import method_inputs, run_method
from tests.unit.class_b_helpers import class_b_params

PROMPT = [5, 9, 14, 22, 9]


@pytest.fixture(scope="module")
def model(one_thread: None) -> Iterator[GPT2LMHeadModel]:
    """Six layers, so "low" ([2]) and "high" ([3, 5]) differ; float64."""
    torch.manual_seed(4)
    config = GPT2Config(
        n_layer=6, n_embd=32, n_head=4, vocab_size=200, n_positions=64, initializer_range=0.2,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    yield GPT2LMHeadModel(config).double().eval()


@pytest.mark.parametrize(
    ("layers", "n", "tied", "expected"),
    [
        ("low", 4, True, [2]),  # the embedded kogpt2-mini: low and high are both layer 2
        ("high", 4, True, [2]),
        ("low", 6, True, [2]),
        ("high", 6, True, [3, 5]),
        ("low", 2, True, [1]),
        ("high", 2, True, [1]),
        ("low", 1, True, [0]),
        ("low", 4, False, [0]),  # untied embeddings: layer 0 is a real candidate
        ("low", 48, True, list(range(2, 20, 2))),
        ("high", 48, True, list(range(28, 48, 2))),
        ([1, 5, 9], 6, True, [1, 5]),  # 4.x drops indices past the last layer
    ],
)
def test_layer_choice_follows_transformers_4(
    layers: str | list[int], n: int, tied: bool, expected: list[int]
) -> None:
    assert candidate_layers(layers, n, tied) == expected


def js_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Jensen-Shannon divergence as 4.x averages it: the mean over the vocabulary."""
    p, q = p_log.exp(), q_log.exp()
    m = 0.5 * (p + q)
    kl_pm = (m * (m.log() - p_log)).mean()
    kl_qm = (m * (m.log() - q_log)).mean()
    return float(0.5 * (kl_pm + kl_qm))


def by_definition(
    model: GPT2LMHeadModel, layers: list[int], steps: int
) -> tuple[list[int], list[int]]:
    """Tokens and contrasted layers, from cache-free forwards."""
    ids, chosen = list(PROMPT), []
    head = model.get_output_embeddings()
    for _ in range(steps):
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
            final = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            early = {i: torch.log_softmax(head(out.hidden_states[i][0, -1]), -1) for i in layers}
        layer = max(layers, key=lambda i: js_divergence(final, early[i]))
        chosen.append(layer)
        keep = final >= final.max() + math.log(0.1)  # the relative-top set
        contrast = torch.where(keep, final - early[layer], torch.tensor(-math.inf))
        ids.append(int(contrast.argmax()))
    return ids[len(PROMPT) :], chosen


@pytest.mark.parametrize("dola_layers", ["low", "high", [2, 3, 4], [0, 1, 2, 3, 4, 5]])
def test_contrasts_the_chosen_layers(model: GPT2LMHeadModel, dola_layers: str | list[int]) -> None:
    params = class_b_params(model, len(PROMPT), dola_layers=dola_layers, max_new_tokens=8)
    chosen: list[int] = []
    with torch.no_grad():
        steps = list(dola_decoding(method_inputs(model, PROMPT, params), dola_layers, chosen))
    tokens = [s.token for s in steps if isinstance(s, TokenChoice)]
    layers = candidate_layers(dola_layers, 6, True)
    assert (tokens, chosen) == by_definition(model, layers, 8)
    assert set(chosen) <= set(layers)
    if dola_layers in ("high", [2, 3, 4]):  # this model's choice changes from step to step
        assert len(set(chosen)) > 1, chosen
    assert tokens == run_method(model, PROMPT, params)[0][0]  # the served path


def test_premature_layers_change_the_output(model: GPT2LMHeadModel) -> None:
    outputs = {
        str(layers): run_method(
            model,
            PROMPT,
            class_b_params(model, len(PROMPT), dola_layers=layers, max_new_tokens=10),
        )[0][0]
        for layers in ("low", "high", [0], [4])
    }
    assert len(set(map(tuple, outputs.values()))) > 1, outputs


def test_seeded_sampling_is_reproducible(model: GPT2LMHeadModel) -> None:
    def sample(seed: int) -> list[int]:
        params = class_b_params(
            model, len(PROMPT), dola_layers="high", do_sample=True, seed=seed, max_new_tokens=10
        )
        return run_method(model, PROMPT, params)[0][0]

    assert sample(7) == sample(7)
    assert len({tuple(sample(s)) for s in range(4)}) > 1
