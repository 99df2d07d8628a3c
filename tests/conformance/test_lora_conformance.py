"""LoRA requests through the engine equal peft's merged model's ``generate``, in float64 on
the embedded model: alone, and mixed in one continuous batch with base requests and another
adapter (greedy, seeded sampling, penalties, top-k / top-p, n=2, beams). The prefix cache
never shares blocks across adapters."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel

from app.engine.engine import EngineConfig, LLMEngine
from app.engine.lora_registry import LoRANotFoundError
from app.modeling.loader import LoadedModel
from app.options.resolve import resolve_sampling_params
from tests.conformance.conftest import encode, padded, run_to_end
from tests.lora_helpers import make_adapters, merged_model
from tests.unit.class_b_helpers import class_b_params

PROMPTS = ["대한민국은", "국회는 국민의", "제1조 대한민국은 민주공화국이다. 모든 권력은"]
OPTIONS: list[dict[str, Any]] = [
    {"max_new_tokens": 12},
    {"max_new_tokens": 12, "do_sample": True, "top_k": 20, "top_p": 0.9, "seed": 7},
    {"max_new_tokens": 10, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
    {"max_new_tokens": 8, "do_sample": True, "num_return_sequences": 2, "seed": 3},
    {"max_new_tokens": 8, "num_beams": 2},
    {"max_new_tokens": 8, "guidance_scale": 1.5, "do_sample": True, "seed": 4},
]

Job = tuple[list[int], dict[str, Any], str | None]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def merged(adapter_dirs: dict[str, Path]) -> dict[str, GPT2LMHeadModel]:
    return {name: merged_model(path) for name, path in adapter_dirs.items()}


def reference(
    model: GPT2LMHeadModel, loaded: LoadedModel, prompt: list[int], options: dict[str, Any]
) -> list[list[int]]:
    options = dict(options)
    torch.manual_seed(options.pop("seed", 0))
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **options,
        )
    return [row[len(prompt) :].tolist() for row in out]


def make_engine(
    loaded: LoadedModel,
    adapter_dirs: dict[str, Path],
    draft_model: GPT2LMHeadModel | None = None,
    **config: Any,
) -> LLMEngine:
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(num_blocks=256, block_size=16, max_num_batched_tokens=64, **config),
        draft_model=draft_model,
    )
    for name, path in adapter_dirs.items():
        engine.lora.load(name, path)
    return engine


def run(engine: LLMEngine, loaded: LoadedModel, jobs: list[Job]) -> list[dict[int, list[int]]]:
    defaults = loaded.generation_config.to_dict()
    for i, (prompt, options, lora_name) in enumerate(jobs):
        params = resolve_sampling_params(
            options,
            defaults,
            int(loaded.config.n_positions),
            len(prompt),
            encode=lambda s: encode(loaded, s),
            vocab_size=int(loaded.config.vocab_size),
        )
        params.lora_name = lora_name
        engine.add_request(f"r{i}", prompt, params)
    return run_to_end(engine, len(jobs))


def expected(loaded: LoadedModel, merged: dict[str, GPT2LMHeadModel], job: Job) -> list[list[int]]:
    prompt, options, lora_name = job
    model = loaded.model if lora_name is None else merged[lora_name]
    return reference(model, loaded, prompt, options)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(sorted(o)))
def test_adapter_alone_equals_merged_generate(
    embedded64: LoadedModel, adapter_dirs, merged, options: dict[str, Any]
) -> None:
    engine = make_engine(embedded64, adapter_dirs)
    job: Job = (encode(embedded64, PROMPTS[2]), options, "chat")
    ref = expected(embedded64, merged, job)
    base = reference(embedded64.model, embedded64, job[0], options)
    assert ref != base  # the adapter changes the output: the test can fail
    got = run(engine, embedded64, [job])[0]
    pad = int(embedded64.generation_config.pad_token_id or 0)
    assert padded(got, ref, pad) == ref


@pytest.mark.parametrize("static_decode", [None, True], ids=["varlen", "static-decode"])
def test_mixed_batch_equals_each_merged_generate(
    embedded64: LoadedModel, adapter_dirs, merged, static_decode: bool | None
) -> None:
    """Base requests, two adapters and several options in one continuous batch: every
    request equals its own model's generate. With the padded decode (what CUDA graphs
    replay) steps with adapter rows run the varlen forward, base-only steps the padded one."""
    names: list[str | None] = [None, "poem", "chat"]
    jobs: list[Job] = [
        (encode(embedded64, PROMPTS[i % len(PROMPTS)]), options, names[(i + j) % 3])
        for i, options in enumerate(OPTIONS[:4])
        for j in range(3)
    ]
    engine = make_engine(embedded64, adapter_dirs, static_decode=static_decode)
    got = run(engine, embedded64, jobs)
    pad = int(embedded64.generation_config.pad_token_id or 0)
    for job, ours in zip(jobs, got, strict=True):
        ref = expected(embedded64, merged, job)
        assert padded(ours, ref, pad) == ref, job


def test_prefix_cache_is_per_adapter(embedded64: LoadedModel, adapter_dirs, merged) -> None:
    """The same 3-block prompt under the base, then adapter A, then A again, then B: only
    the second A request hits the cache, and each output stays its model's."""
    prompt = encode(embedded64, PROMPTS[2] * 6)[:49]
    options = {"max_new_tokens": 4}
    engine = make_engine(embedded64, adapter_dirs)
    sequence: list[str | None] = [None, "poem", "poem", "chat"]
    hits = []
    pad = int(embedded64.generation_config.pad_token_id or 0)
    for name in sequence:
        before = engine.kv.prefix_hits
        got = run(engine, embedded64, [(prompt, options, name)])[0]
        hits.append(engine.kv.prefix_hits - before)
        ref = expected(embedded64, merged, (prompt, options, name))
        assert padded(got, ref, pad) == ref, name
    assert hits == [0, 0, 3, 0]


def _run_one(engine: LLMEngine, prompt: list[int], params: Any, diag: tuple[str, ...] = ()):
    engine.add_request("one", prompt, params, diag)
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            tokens += [t for seq in out.outputs for t in seq.token_ids]
    return tokens


def test_lanes_with_an_adapter_run_its_merged_model(
    embedded64: LoadedModel, adapter_dirs, merged
) -> None:
    """What runs on transformers' model rather than the paged forward runs on a merged
    copy of the base and the adapter (engine/merged_models.py): token healing and the exact
    lane equal the merged model's generate, contrastive search (a class-B lane) equals the
    same lane run by an engine whose model is the merged one; an unknown name is refused."""
    engine = make_engine(embedded64, adapter_dirs)
    prompt = encode(embedded64, PROMPTS[0])
    defaults = embedded64.generation_config.to_dict()

    def params(lora_name: str | None, **options: Any) -> Any:
        resolved = resolve_sampling_params(
            {"max_new_tokens": 8, **options},
            defaults,
            int(embedded64.config.n_positions),
            len(prompt),
            encode=lambda s: encode(embedded64, s),
            vocab_size=int(embedded64.config.vocab_size),
        )
        resolved.lora_name = lora_name  # set by the routes, not an option
        return resolved

    poem = merged["poem"]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        healed = poem.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            tokenizer=embedded64.tokenizer,
            token_healing=True,
            max_new_tokens=8,
        )[0].tolist()
        greedy = poem.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8)
    base_greedy = reference(embedded64.model, embedded64, prompt, {"max_new_tokens": 8})[0]
    assert greedy[0, len(prompt) :].tolist() != base_greedy  # the adapter matters here
    got = _run_one(engine, prompt, params("poem", token_healing=True))
    assert got == healed[-len(got) :] and len(got) == 8
    got = _run_one(engine, prompt, params("poem"), ("output_hidden_states",))
    assert got == greedy[0, len(prompt) :].tolist()

    options = {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 8}
    contrastive = class_b_params(embedded64, len(prompt), **options)
    contrastive.lora_name = "poem"
    ours = _run_one(engine, prompt, contrastive)
    alone = LLMEngine(poem, embedded64.tokenizer, EngineConfig(num_blocks=64, block_size=16))
    theirs = _run_one(alone, prompt, class_b_params(embedded64, len(prompt), **options))
    assert ours == theirs and len(ours) == 8
    contrastive.lora_name = None
    assert _run_one(engine, prompt, contrastive) != ours  # the base's differs: it can fail
    assert len(engine._merged) == 1  # one merged copy kept for the adapter

    with pytest.raises(LoRANotFoundError, match="served: poem, chat"):
        engine.add_request("c", prompt, params("nope"))
    assert not engine.has_unfinished()


def test_unload_lets_running_requests_finish(embedded64: LoadedModel, adapter_dirs, merged) -> None:
    """An adapter unloaded while its request runs: the request finishes with it (equal to
    the merged model), and a new request for the name is refused."""
    engine = make_engine(embedded64, adapter_dirs)
    prompt = encode(embedded64, PROMPTS[1])
    options = {"max_new_tokens": 10}
    params = resolve_sampling_params(
        options,
        embedded64.generation_config.to_dict(),
        int(embedded64.config.n_positions),
        len(prompt),
        vocab_size=int(embedded64.config.vocab_size),
    )
    params.lora_name = "chat"
    engine.add_request("r0", prompt, params)
    tokens: list[int] = []
    for out in engine.step():
        tokens += [t for seq in out.outputs for t in seq.token_ids]
    assert engine.lora_activity() == (["chat"], [])  # the metrics' running adapters
    engine.lora.unload("chat")
    with pytest.raises(LoRANotFoundError):
        engine.add_request("r1", prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            tokens += [t for seq in out.outputs for t in seq.token_ids]
    ref = expected(embedded64, merged, (prompt, options, "chat"))
    assert tokens == ref[0]


def test_speculative_decoding_with_adapters(embedded64: LoadedModel, adapter_dirs, merged) -> None:
    """Drafts from prompt lookup and from a draft model (a 2-layer copy of the base, without
    the adapter) are verified by the adapter's forward: the output is the merged model's."""
    draft = copy.deepcopy(embedded64.model)
    draft.transformer.h = draft.transformer.h[:2]
    draft.config.n_layer = 2
    prompt = encode(embedded64, PROMPTS[2] * 2)
    jobs: list[Job] = [
        (prompt, {"max_new_tokens": 16, "prompt_lookup_num_tokens": 3}, "chat"),
        (prompt, {"max_new_tokens": 16, "num_assistant_tokens": 3}, "poem"),
        (prompt, {"max_new_tokens": 16, "do_sample": True, "seed": 5}, None),
    ]
    engine = make_engine(embedded64, adapter_dirs, draft_model=draft)
    got = run(engine, embedded64, jobs)
    assert engine.stats()["spec_draft_tokens"] > 0
    pad = int(embedded64.generation_config.pad_token_id or 0)
    for job, ours in zip(jobs, got, strict=True):
        plain = {k: v for k, v in job[1].items() if k not in ("num_assistant_tokens",)}
        ref = expected(embedded64, merged, (job[0], plain, job[2]))
        assert padded(ours, ref, pad) == ref, job


def test_prompt_logprobs_with_an_adapter(embedded64: LoadedModel, adapter_dirs, merged) -> None:
    """Prompt log-probs computed in the batched prefill with an adapter (beside a base
    request asking too) equal the merged model's log_softmax over the prompt."""
    prompt = encode(embedded64, PROMPTS[2])
    engine = make_engine(embedded64, adapter_dirs)
    for request_id, name in (("a", "poem"), ("b", None)):
        params = resolve_sampling_params(
            {"max_new_tokens": 1},
            embedded64.generation_config.to_dict(),
            int(embedded64.config.n_positions),
            len(prompt),
            vocab_size=int(embedded64.config.vocab_size),
        )
        params.prompt_logprobs, params.lora_name = 0, name
        engine.add_request(request_id, prompt, params)
    got: dict[str, list[float]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs:
                got[out.request_id] = [p.logprob for p in out.prompt_logprobs if p is not None]
    for request_id, model in (("a", merged["poem"]), ("b", embedded64.model)):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt])).logits[0, :-1]
        ref = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(prompt[1:])[:, None])
        got_t = torch.tensor(got[request_id], dtype=torch.float64)
        torch.testing.assert_close(got_t, ref[:, 0], rtol=0, atol=1e-10)
    assert got["a"] != got["b"]
