"""Beam search with stop strings equals model.generate (found by the load test: it was a 422).

generate drops its `tokenizer` argument when `custom_generate` is a callable, so
prepare_generation adds the stop-string criterion itself; this checks the result is exact.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from app.engine.engine import LLMEngine
from app.modeling.loader import DEFAULT_MODEL_DIR, LoadedModel, load_model
from app.options.resolve import resolve_sampling_params
from tests.unit.test_engine import make_engine

PROMPTS = ("대한민국은", "모든 국민은 법 앞에 평등하다.", "헌법", "법원은")
CASES: list[dict[str, Any]] = [
    {"num_beams": 2, "stop_strings": ["."]},
    {"num_beams": 3, "stop_strings": ["다", "의"], "num_return_sequences": 2},
]


@pytest.fixture(scope="module")
def embedded() -> LoadedModel:
    return load_model(str(DEFAULT_MODEL_DIR), device="cpu")


def engine_sequences(engine: LLMEngine, prompt: list[int], options: dict[str, Any]) -> list[Any]:
    params = resolve_sampling_params(options, {}, 1024, len(prompt))
    engine.add_request("beams", prompt, params)
    got: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for seq in out.outputs:
                got.setdefault(seq.index, []).extend(seq.token_ids)
    return [got[i] for i in sorted(got)]


@pytest.mark.parametrize("options", CASES)
def test_beams_with_stop_strings_equal_generate(
    embedded: LoadedModel, one_thread: None, options: dict[str, Any]
) -> None:
    options = {**options, "max_new_tokens": 20}
    tokenizer = embedded.tokenizer
    engine = make_engine(embedded.model, tokenizer, num_blocks=256, block_size=16)
    stopped_early = 0
    for text in PROMPTS:
        prompt = tokenizer(text)["input_ids"]
        ids = torch.tensor([prompt])
        ref = embedded.model.generate(
            ids, attention_mask=torch.ones_like(ids), tokenizer=tokenizer, **options
        )
        pad = tokenizer.pad_token_id
        want = [[t for t in row[len(prompt) :].tolist() if t != pad] for row in ref]
        got = engine_sequences(engine, prompt, options)
        assert got == want, (text, options)
        stopped_early += sum(len(seq) < options["max_new_tokens"] for seq in got)
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert stopped_early > 0  # the stop strings did end some beams
