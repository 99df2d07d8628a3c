"""LLMEngine end to end on a tiny float64 GPT-2: output equals model.generate exactly."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from app.engine.async_engine import AsyncEngine
from app.engine.core.request import FinishReason
from app.engine.engine import EngineConfig, LLMEngine
from app.options.resolve import resolve_sampling_params

PROMPTS = ["대한민국은 민주공화국이다", "모든 국민은", "제1조 " * 12, "국회는"]
OPTIONS: list[dict[str, Any]] = [
    {"max_new_tokens": 12},
    {"max_new_tokens": 10, "do_sample": True, "seed": 3},
    {"max_new_tokens": 8, "do_sample": True, "top_k": 0, "temperature": 0.7, "seed": 5},
    {"max_new_tokens": 9, "do_sample": True, "top_k": 50, "top_p": 0.92, "seed": 11},
]


def make_engine(model, tokenizer, **overrides: Any) -> LLMEngine:  # type: ignore[no-untyped-def]
    config = EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=16)
    for key, value in overrides.items():
        setattr(config, key, value)
    return LLMEngine(model, tokenizer, config)


def hf_generate(model, prompt: list[int], options: dict[str, Any]) -> list[int]:  # type: ignore[no-untyped-def]
    options = dict(options)
    torch.manual_seed(options.pop("seed", 0))
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    return out[0, len(prompt) :].tolist()


def run_all(
    engine: LLMEngine, jobs: list[tuple[list[int], dict[str, Any]]]
) -> dict[str, list[int]]:
    config = engine.runner.config
    for i, (prompt, options) in enumerate(jobs):
        params = resolve_sampling_params(options, {}, config.n_positions, len(prompt))
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(jobs))}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for seq in out.outputs:
                tokens[out.request_id] += seq.token_ids
        engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return tokens


def test_batched_engine_equals_generate_alone(tiny_model, tiny_tokenizer) -> None:
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = list(zip(prompts, OPTIONS, strict=True))
    got = run_all(make_engine(tiny_model, tiny_tokenizer), jobs)
    for i, (prompt, options) in enumerate(jobs):
        assert got[f"r{i}"] == hf_generate(tiny_model, prompt, options), f"request {i}"


def test_preemption_does_not_change_output(tiny_model, tiny_tokenizer) -> None:
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = [(p, {**o, "max_new_tokens": 30}) for p, o in zip(prompts, OPTIONS, strict=True)]
    roomy = run_all(make_engine(tiny_model, tiny_tokenizer), jobs)
    tight_engine = make_engine(
        tiny_model, tiny_tokenizer, num_blocks=20, enable_prefix_caching=False
    )
    tight = run_all(tight_engine, jobs)
    assert tight_engine.scheduler.num_preemptions > 0
    assert tight == roomy


def test_prefix_cache_hit_gives_same_output(tiny_model, tiny_tokenizer) -> None:
    engine = make_engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer(PROMPTS[2])["input_ids"]
    first = run_all(engine, [(prompt, OPTIONS[0])])
    engine.scheduler.requests.clear()
    second = run_all(engine, [(prompt, OPTIONS[0])])
    assert engine.kv.prefix_hits > 0
    assert first == second


def test_text_stream_concatenates_to_decode(tiny_model, tiny_tokenizer) -> None:
    engine = make_engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer(PROMPTS[0])["input_ids"]
    params = resolve_sampling_params(
        {"max_new_tokens": 25, "do_sample": True, "seed": 1}, {}, 128, len(prompt)
    )
    engine.add_request("a", prompt, params)
    text, ids = "", []
    while engine.has_unfinished():
        for out in engine.step():
            for seq in out.outputs:
                assert "\ufffd" not in seq.text or "\ufffd" in tiny_tokenizer.decode(
                    ids + seq.token_ids
                )
                text += seq.text
                ids += seq.token_ids
    assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_text_and_finishes(tiny_model, tiny_tokenizer) -> None:
    engine = make_engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer(PROMPTS[1])["input_ids"]
    options = {"max_new_tokens": 20, "do_sample": True, "seed": 7}
    free_run = run_all(engine, [(prompt, options)])["r0"]
    # the stop string: the text of a later token that is whole UTF-8 on its own
    texts = [tiny_tokenizer.decode([t]) for t in free_run]
    index = next(i for i in range(3, 20) if texts[i].strip() and "\ufffd" not in texts[i])
    stop = texts[index].strip()
    engine.add_request(
        "s",
        prompt,
        resolve_sampling_params({**options, "stop_strings": [stop]}, {}, 128, len(prompt)),
    )
    text, ids, reason = "", [], None
    while engine.has_unfinished():
        for out in engine.step():
            for seq in out.outputs:
                text += seq.text
                ids += seq.token_ids
                reason = seq.finish_reason or reason
    assert reason is FinishReason.STOP
    assert ids == free_run[: len(ids)] and len(ids) <= index + 1  # token ids keep the stop string
    assert stop not in text
    assert tiny_tokenizer.decode(ids).startswith(text)


def test_abort_frees_blocks(tiny_model, tiny_tokenizer) -> None:
    engine = make_engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer(PROMPTS[2])["input_ids"]
    params = resolve_sampling_params({"max_new_tokens": 50}, {}, 128, len(prompt))
    engine.add_request("a", prompt, params)
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    assert engine.abort_request("a")
    engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_failing_request_fails_alone(tiny_model, tiny_tokenizer, monkeypatch) -> None:
    engine = make_engine(tiny_model, tiny_tokenizer)
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    for i, prompt in enumerate(prompts):
        params = resolve_sampling_params({"max_new_tokens": 6}, {}, 128, len(prompt))
        engine.add_request(f"r{i}", prompt, params)
    original = engine._states["r1"].output.check
    calls = {"n": 0}

    def exploding(token_ids):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(token_ids)

    engine._states["r1"].output.check = exploding
    errors, finished = {}, set()
    while engine.has_unfinished():
        for out in engine.step():
            if out.error:
                errors[out.request_id] = out.error
            if out.finished:
                finished.add(out.request_id)
    assert set(errors) == {"r1"} and "boom" in errors["r1"]
    assert finished == {"r0", "r1"}
    engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_async_engine_streams_and_aborts(tiny_model, tiny_tokenizer) -> None:
    engine = AsyncEngine(make_engine(tiny_model, tiny_tokenizer))
    engine.start()
    prompt = tiny_tokenizer(PROMPTS[0])["input_ids"]

    async def main() -> tuple[list[int], list[int]]:
        params = resolve_sampling_params({"max_new_tokens": 10}, {}, 128, len(prompt))
        full: list[int] = []
        async for out in engine.generate(prompt, params):
            for seq in out.outputs:
                full += seq.token_ids
        long_params = resolve_sampling_params({"max_new_tokens": 100}, {}, 128, len(prompt))
        partial: list[int] = []
        async for out in engine.generate(prompt, long_params):
            partial += out.outputs[0].token_ids
            if len(partial) >= 3:
                break  # closing the stream aborts the request
        return full, partial

    try:
        full, partial = asyncio.run(main())
        assert full == hf_generate(tiny_model, prompt, {"max_new_tokens": 10})
        assert len(partial) >= 3
        for _ in range(100):  # the abort is processed by the engine thread
            if not engine.engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.02))
        assert engine.engine.kv.num_free_blocks == engine.engine.kv.num_blocks
    finally:
        engine.stop()


@pytest.mark.parametrize("block_size", [1, 16])
def test_block_sizes(tiny_model, tiny_tokenizer, block_size: int) -> None:
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    jobs = list(zip(prompts, OPTIONS[:2], strict=True))
    got = run_all(make_engine(tiny_model, tiny_tokenizer, block_size=block_size), jobs)
    for i, (prompt, options) in enumerate(jobs):
        assert got[f"r{i}"] == hf_generate(tiny_model, prompt, options)


def test_max_time_stops_generation(tiny_model, tiny_tokenizer) -> None:
    engine = make_engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer(PROMPTS[0])["input_ids"]
    options = {"max_new_tokens": 100, "max_time": 0.05}
    params = resolve_sampling_params(options, {}, 128, len(prompt))
    engine.add_request("t", prompt, params)
    tokens, reason = [], None
    while engine.has_unfinished():
        for out in engine.step():
            for seq in out.outputs:
                tokens += seq.token_ids
                reason = seq.finish_reason or reason
        time.sleep(0.01)
    assert reason is FinishReason.LENGTH and 1 <= len(tokens) < 100
