"""Several full models in one engine (--model NAME=PATH ...), in float64 on CPU: a fine-tune
of the embedded model (its own generation_config), a model of another depth (another KV
layout) and a LoRA adapter of the fine-tune, mixed with the default model in one continuous
batch: every request equals its own model's ``generate``. One block pool for all; models of
one layout share the KV tensors; the prefix cache never hands one model another's blocks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel

from app.engine.engine import EngineConfig, LLMEngine, ModelNotServedError
from app.modeling.loader import LoadedModel, load_model
from app.options.resolve import resolve_sampling_params
from tests.conformance.conftest import encode, padded, run_to_end
from tests.lora_helpers import make_adapter, make_finetune

PROMPTS = ["대한민국은", "국회는 국민의", "제1조 대한민국은 민주공화국이다. 모든 권력은"]
OPTIONS: list[dict[str, Any]] = [
    {"max_new_tokens": 10},
    {"max_new_tokens": 10, "do_sample": True, "top_k": 20, "top_p": 0.9, "seed": 7},
    {"max_new_tokens": 8, "do_sample": True, "num_return_sequences": 2, "seed": 3},
    {"max_new_tokens": 8, "num_beams": 2},
]
Job = tuple[list[int], dict[str, Any], str | None, str | None]  # prompt, options, model, lora


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("models")
    tuned = make_finetune(root / "tuned", 5, generation={"repetition_penalty": 1.3})
    shallow = make_finetune(root / "shallow", 6, config={"n_layer": 2})
    return {
        name: load_model(str(path), device="cpu", dtype="float64")
        for name, path in (("tuned", tuned), ("shallow", shallow))
    }


@pytest.fixture(scope="module")
def tuned_adapter(tmp_path_factory: pytest.TempPathFactory, models) -> tuple[Path, GPT2LMHeadModel]:
    """A LoRA adapter of the fine-tune, and peft's merged model of it."""
    from peft import PeftModel

    base_dir = Path(models["tuned"].model.name_or_path)
    folder = make_adapter(
        tmp_path_factory.mktemp("lora") / "verse", 21, 8, 16, ["c_attn"], base_dir
    )
    base = GPT2LMHeadModel.from_pretrained(base_dir, torch_dtype=torch.float64)
    return folder, PeftModel.from_pretrained(base, folder).merge_and_unload().eval()


def make_engine(
    embedded64: LoadedModel, models: dict[str, LoadedModel], **config: Any
) -> LLMEngine:
    return LLMEngine(
        embedded64.model,
        embedded64.tokenizer,
        EngineConfig(num_blocks=256, block_size=16, max_num_batched_tokens=64, **config),
        more_models={name: loaded.model for name, loaded in models.items()},
        model_name="base",
    )


def run(engine: LLMEngine, loaded: dict[str | None, LoadedModel], jobs: list[Job]) -> list[Any]:
    for i, (prompt, options, model, lora) in enumerate(jobs):
        own = loaded[model]  # its own generation_config gives the defaults (as the API does)
        params = resolve_sampling_params(
            options,
            own.generation_config.to_dict(),
            int(own.config.n_positions),
            len(prompt),
            vocab_size=int(own.config.vocab_size),
        )
        params.model_name, params.lora_name = model, lora
        engine.add_request(f"r{i}", prompt, params)
    return run_to_end(engine, len(jobs), check_each_step=True)


def reference(
    model: GPT2LMHeadModel, prompt: list[int], options: dict[str, Any]
) -> list[list[int]]:
    options = dict(options)
    torch.manual_seed(options.pop("seed", 0))
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    return [row[len(prompt) :].tolist() for row in out]


@pytest.mark.parametrize("static_decode", [None, True], ids=["varlen", "static-decode"])
def test_mixed_models_each_equal_their_generate(
    embedded64: LoadedModel, models, tuned_adapter, static_decode: bool | None
) -> None:
    """With the padded decode (what CUDA graphs replay), each model's decode rows run its
    own padded forward in the same step."""
    folder, merged = tuned_adapter
    engine = make_engine(embedded64, models, static_decode=static_decode)
    engine.lora.load("verse", folder, base="tuned")
    loaded: dict[str | None, LoadedModel] = {None: embedded64, **models}
    targets: list[tuple[str | None, str | None]] = [
        (None, None),
        ("tuned", None),
        ("shallow", None),
        ("tuned", "verse"),
    ]
    jobs: list[Job] = [
        (encode(embedded64, PROMPTS[(i + j) % 3]), options, *targets[(i + j) % 4])
        for i, options in enumerate(OPTIONS)
        for j in range(4)
    ]
    got = run(engine, loaded, jobs)
    pad = int(embedded64.generation_config.pad_token_id or 0)
    outputs: dict[tuple[str | None, str | None], list[list[list[int]]]] = {}
    for job, ours in zip(jobs, got, strict=True):
        prompt, options, model, lora = job
        hf = merged if lora else loaded[model].model
        ref = reference(hf, prompt, options)
        assert padded(ours, ref, pad) == ref, job[1:]
        if options == OPTIONS[0]:
            outputs.setdefault((model, lora), []).append(ref)
    # The models differ (the test can fail): greedy references of one prompt per model.
    greedy = {
        target: reference(
            merged if target[1] else loaded[target[0]].model,
            encode(embedded64, PROMPTS[2]),
            {
                "max_new_tokens": 10,
                "repetition_penalty": loaded[target[0]].generation_config.repetition_penalty,
            },
        )[0]
        for target in targets
    }
    assert len({tuple(v) for v in greedy.values()}) == 4
    kv = engine.runner.kv_caches
    assert kv[0] is kv[1] and kv[2] is not kv[0]  # the fine-tune shares the base's tensors


def test_prefix_cache_is_per_model(embedded64: LoadedModel, models) -> None:
    """The same 3-block prompt under the default model, the fine-tune (same KV layout: the
    blocks would fit its tensors, but are another model's KV), the fine-tune again: only
    the repeat hits the cache."""
    engine = make_engine(embedded64, models)
    prompt = encode(embedded64, PROMPTS[2] * 6)[:49]
    loaded: dict[str | None, LoadedModel] = {None: embedded64, **models}
    hits = []
    for model in [None, "tuned", "tuned", "shallow", None]:
        before = engine.kv.prefix_hits
        got = run(engine, loaded, [(prompt, {"max_new_tokens": 4}, model, None)])[0]
        hits.append(engine.kv.prefix_hits - before)
        own = loaded[model]
        ref = reference(
            own.model,
            prompt,
            {"max_new_tokens": 4, "repetition_penalty": own.generation_config.repetition_penalty},
        )
        assert got[0] == ref[0], model
    assert hits == [0, 0, 3, 0, 3]


def test_unknown_model_is_refused(embedded64: LoadedModel, models) -> None:
    engine = make_engine(embedded64, models)
    prompt = encode(embedded64, PROMPTS[0])
    params = resolve_sampling_params(
        {"max_new_tokens": 2}, {}, 1024, len(prompt), vocab_size=int(embedded64.config.vocab_size)
    )
    params.model_name = "nope"
    with pytest.raises(ModelNotServedError, match="served: base, tuned, shallow"):
        engine.add_request("x", prompt, params)
    params.model_name = "base"  # the default model by its own name
    engine.add_request("y", prompt, params)
    assert engine.scheduler.requests["y"].model == 0


def test_speculation_and_prompt_logprobs_per_model(embedded64: LoadedModel, models) -> None:
    """Drafts (prompt lookup; a draft model mirroring every model's sequences) are verified
    by each request's own model, and prompt log-probs come from its own forward."""
    draft = copy.deepcopy(embedded64.model)
    draft.transformer.h = draft.transformer.h[:2]
    draft.config.n_layer = 2
    engine = LLMEngine(
        embedded64.model,
        embedded64.tokenizer,
        EngineConfig(num_blocks=256, block_size=16, max_num_batched_tokens=64),
        draft_model=draft,
        more_models={name: loaded.model for name, loaded in models.items()},
        model_name="base",
    )
    loaded: dict[str | None, LoadedModel] = {None: embedded64, **models}
    prompt = encode(embedded64, PROMPTS[2] * 2)
    jobs: list[Job] = [
        (prompt, {"max_new_tokens": 12, "prompt_lookup_num_tokens": 3}, "tuned", None),
        (prompt, {"max_new_tokens": 12, "num_assistant_tokens": 3}, "shallow", None),
        (prompt, {"max_new_tokens": 12, "num_assistant_tokens": 3}, None, None),
    ]
    got = run(engine, loaded, jobs)
    assert engine.stats()["spec_draft_tokens"] > 0
    for job, ours in zip(jobs, got, strict=True):
        plain = {k: v for k, v in job[1].items() if k != "num_assistant_tokens"}
        assert ours[0] == reference(loaded[job[2]].model, prompt, plain)[0], job[2]

    short = encode(embedded64, PROMPTS[2])
    for i, model in enumerate([None, "tuned", "shallow"]):
        params = resolve_sampling_params(
            {"max_new_tokens": 1},
            {},
            1024,
            len(short),
            vocab_size=int(embedded64.config.vocab_size),
        )
        params.prompt_logprobs, params.model_name = 0, model
        engine.add_request(f"p{i}", short, params)
    scored: dict[str, list[float]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs:
                scored[out.request_id] = [p.logprob for p in out.prompt_logprobs if p is not None]
    for i, model in enumerate([None, "tuned", "shallow"]):
        with torch.inference_mode():
            logits = loaded[model].model(torch.tensor([short])).logits[0, :-1]
        ref = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(short[1:])[:, None])[:, 0]
        got_t = torch.tensor(scored[f"p{i}"], dtype=torch.float64)
        torch.testing.assert_close(got_t, ref, rtol=0, atol=1e-10)
