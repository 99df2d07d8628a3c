"""The class-B methods produce transformers 4.x's tokens on the embedded checkpoint.

tests/data/class_b_reference.json holds what transformers 4.46.3's own `model.generate`
returned (float64, models/kogpt2-mini) for contrastive search, group beam search, DoLa
(greedy and seeded sampling) and constrained beam search; tests/data/class_b_reference.py
made it (it needs transformers 4.x). Here the same options go through the server's
validation (`resolve_sampling_params` then `resolve_class_b`) and the ported methods.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel

from app.engine.class_b.options import CLASS_B_OPTIONS, ClassBParams, resolve_class_b
from app.engine.class_b.runner import run_method
from app.engine.sampling_params import resolve_sampling_params

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((ROOT / "tests/data/class_b_reference.json").read_text(encoding="utf-8"))
CASES = REFERENCE["cases"]


@pytest.fixture(scope="module")
def model(one_thread: None) -> Iterator[GPT2LMHeadModel]:
    yield GPT2LMHeadModel.from_pretrained(ROOT / "models/kogpt2-mini", dtype=torch.float64).eval()


def params_for(model: GPT2LMHeadModel, case: dict[str, Any]) -> ClassBParams:
    options = dict(case["options"])
    class_b = {k: options.pop(k) for k in list(options) if k in CLASS_B_OPTIONS}
    config = model.config
    params = resolve_sampling_params(
        options,
        model.generation_config.to_dict(),
        config.n_positions,
        len(case["prompt_ids"]),
        vocab_size=config.vocab_size,
    )
    resolved = resolve_class_b(
        class_b, params, num_layers=config.n_layer, vocab_size=config.vocab_size
    )
    assert isinstance(resolved, ClassBParams)
    return resolved


def test_reference_covers_every_method() -> None:
    assert REFERENCE["generated_by"]["transformers"].startswith("4.")
    options = [case["options"] for case in CASES]
    for name in ("penalty_alpha", "num_beam_groups", "dola_layers", "force_words_ids"):
        assert any(name in o for o in options), name
    assert any("constraints" in o for o in options)
    assert any(o.get("do_sample") for o in options if "dola_layers" in o)


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{i}-{sorted(c['options'])[0]}" for i, c in enumerate(CASES)]
)
def test_same_tokens_as_transformers_4(model: GPT2LMHeadModel, case: dict[str, Any]) -> None:
    results = run_method(model, case["prompt_ids"], params_for(model, case))
    assert [tokens for tokens, _ in results] == case["sequences"]
    if "sequence_scores" in case:  # float32 in 4.x and here
        scores = [score for _, score in results]
        assert scores == pytest.approx(case["sequence_scores"], rel=1e-6)
    if "logprobs" in case:
        assert results[0][1] == pytest.approx(sum(case["logprobs"]), abs=1e-9)
