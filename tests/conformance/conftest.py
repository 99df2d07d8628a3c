"""The embedded model in float64 on CPU: engine output must equal model.generate exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel

from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.loader import DEFAULT_MODEL_DIR, LoadedModel, load_model
from app.options.resolve import resolve_sampling_params


@pytest.fixture(scope="session")
def embedded64() -> LoadedModel:
    return load_model(str(DEFAULT_MODEL_DIR), device="cpu", dtype="float64")


def encode(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_generate(loaded: LoadedModel, prompt: list[int], options: dict[str, Any]) -> list[list[int]]:
    """`torch.manual_seed(s); model.generate(...)`: generated ids per returned sequence."""
    options = dict(options)
    torch.manual_seed(options.pop("seed", 0))
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), tokenizer=loaded.tokenizer, **options
        )
    return [row[len(prompt) :].tolist() for row in out]


def engine_generate(
    loaded: LoadedModel, jobs: list[tuple[list[int], dict[str, Any]]], **config: Any
) -> list[dict[int, list[int]]]:
    """Run all jobs in one engine (one continuous batch); ids per sequence per job."""
    return engine_run(loaded, jobs, **config)[0]


def engine_run(
    loaded: LoadedModel,
    jobs: list[tuple[list[int], dict[str, Any]]],
    draft_model: GPT2LMHeadModel | None = None,
    check_each_step: bool = False,
    **config: Any,
) -> tuple[list[dict[int, list[int]]], LLMEngine]:
    """engine_generate, also returning the engine (its counters) after the run; optionally
    with a draft model, and the KV integrity check after every step, not just at the end."""
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            num_blocks=config.get("num_blocks", 512),
            block_size=config.get("block_size", 16),
            max_num_batched_tokens=config.get("max_num_batched_tokens", 64),
        ),
        draft_model=draft_model,
    )
    defaults = loaded.generation_config.to_dict()
    n_positions = int(loaded.config.n_positions)
    for i, (prompt, options) in enumerate(jobs):
        params = resolve_sampling_params(
            options,
            defaults,
            n_positions,
            len(prompt),
            encode=lambda s: encode(loaded, s),
            vocab_size=int(loaded.config.vocab_size),
        )
        engine.add_request(f"r{i}", prompt, params)
    return run_to_end(engine, len(jobs), check_each_step), engine


def run_to_end(
    engine: LLMEngine, num_jobs: int, check_each_step: bool = False
) -> list[dict[int, list[int]]]:
    """Step the engine until its requests "r0".."r{n-1}" end: the new tokens of each, per
    sequence index; no request may fail, and at the end the KV cache is intact and free."""
    got: list[dict[int, list[int]]] = [{} for _ in range(num_jobs)]
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for seq in out.outputs:
                got[int(out.request_id[1:])].setdefault(seq.index, []).extend(seq.token_ids)
        if check_each_step:
            engine.check_integrity()
    engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return got


def padded(ours: dict[int, list[int]], ref: list[list[int]], pad: int) -> list[list[int]]:
    """generate pads shorter returned sequences to the longest one's length."""
    return [ours.get(i, []) + [pad] * (len(r) - len(ours.get(i, []))) for i, r in enumerate(ref)]
