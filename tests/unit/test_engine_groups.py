"""Beam search and num_return_sequences inside the continuous batch equal model.generate."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from app.engine.engine import LLMEngine
from app.options.resolve import resolve_sampling_params
from tests.unit.test_engine import PROMPTS, make_engine

BEAM_CASES: list[dict[str, Any]] = [
    {"num_beams": 5, "no_repeat_ngram_size": 2, "num_return_sequences": 5, "early_stopping": True},
    {"num_beams": 3},
    {"num_beams": 4, "do_sample": True, "num_return_sequences": 2, "seed": 7},
    {"num_beams": 3, "length_penalty": -0.5, "early_stopping": "never"},
]
SAMPLE_CASES: list[dict[str, Any]] = [
    {"do_sample": True, "top_k": 50, "top_p": 0.92, "num_return_sequences": 3, "seed": 4},
    {"do_sample": True, "top_k": 0, "temperature": 0.7, "num_return_sequences": 2, "seed": 9},
]


def hf_sequences(model, prompt: list[int], options: dict[str, Any]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Generated ids per returned sequence, with generate's trailing padding removed."""
    options = dict(options)
    torch.manual_seed(options.pop("seed", 0))
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    return [row[len(prompt) :].tolist() for row in out]


def run(
    engine: LLMEngine, jobs: list[tuple[list[int], dict[str, Any]]]
) -> dict[str, dict[int, list[int]]]:
    for i, (prompt, options) in enumerate(jobs):
        params = resolve_sampling_params(options, {}, 128, len(prompt))
        engine.add_request(f"r{i}", prompt, params)
    got: dict[str, dict[int, list[int]]] = {f"r{i}": {} for i in range(len(jobs))}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for seq in out.outputs:
                got[out.request_id].setdefault(seq.index, []).extend(seq.token_ids)
        engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return got


def pad_like(ours: list[int], ref: list[int], pad: int) -> list[int]:
    return ours + [pad] * (len(ref) - len(ours))


@pytest.mark.parametrize("options", BEAM_CASES + SAMPLE_CASES, ids=lambda o: ",".join(o))
def test_group_request_alone_and_in_a_busy_batch(tiny_model, tiny_tokenizer, options) -> None:
    options = {**options, "max_new_tokens": 10}
    prompt = tiny_tokenizer(PROMPTS[0])["input_ids"]
    ref = hf_sequences(tiny_model, prompt, options)
    busy = [
        (tiny_tokenizer(p)["input_ids"], {"max_new_tokens": 12, "do_sample": True, "seed": i})
        for i, p in enumerate(PROMPTS[1:])
    ]
    for jobs in ([(prompt, options)], [busy[0], (prompt, options), *busy[1:]]):
        got = run(make_engine(tiny_model, tiny_tokenizer), jobs)
        mine = got["r1" if len(jobs) > 1 else "r0"]
        assert len(mine) == len(ref)
        for index, ref_ids in enumerate(ref):
            assert pad_like(mine[index], ref_ids, 1) == ref_ids, (options, index)


def test_beams_share_blocks_and_survive_preemption(tiny_model, tiny_tokenizer) -> None:
    prompt = tiny_tokenizer(PROMPTS[2])["input_ids"]
    options = {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 20}
    ref = hf_sequences(tiny_model, prompt, options)
    others = [(tiny_tokenizer(p)["input_ids"], {"max_new_tokens": 80}) for p in PROMPTS]
    engine = make_engine(tiny_model, tiny_tokenizer, num_blocks=60, enable_prefix_caching=False)
    got = run(engine, [(prompt, options), *others])
    assert engine.scheduler.num_preemptions > 0
    for index, ref_ids in enumerate(ref):
        assert pad_like(got["r0"][index], ref_ids, 1) == ref_ids
    for i, (other_prompt, other_options) in enumerate(others, start=1):
        assert got[f"r{i}"][0] == hf_sequences(tiny_model, other_prompt, other_options)[0]
