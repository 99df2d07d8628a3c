"""The LoRA hook of the paged forward (app/modeling/gpt2.py ``run_layers``) in batch-invariant
mode: a sequence's logits with an adapter are bit-identical alone and in a step with base
rows, rows of another adapter and more rows of its own adapter (the adapters' matmuls run
row-invariant there); and a step without adapters takes the plain path (no plan). The float64
equality with peft's merged model is tests/conformance/test_lora_conformance.py's."""

from __future__ import annotations

import random
from itertools import chain, repeat

import pytest
import torch

from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.lora import (
    GPT2_LORA_MODULES,
    LoRAAdapter,
    LoRAWeights,
    StepLoRA,
    add_lora,
    plan_lora_rows,
)
from app.modeling.native import load_kernels
from tests.unit.test_batch_invariance import BLOCK, N_POSITIONS, VOCAB, random_gpt2

needs_native = pytest.mark.skipif(
    load_kernels()[0] is None, reason=f"native kernels unavailable: {load_kernels()[1]}"
)


def random_adapter(name: str, model: PagedGPT2, rank: int, seed: int) -> LoRAAdapter:
    generator = torch.Generator().manual_seed(seed)
    E = model.n_embd
    shapes = {"attn.c_attn": (E, 3 * E), "attn.c_proj": (E, E), "mlp.c_fc": (E, 4 * E)}
    shapes["mlp.c_proj"] = (4 * E, E)
    weights = {}
    for layer in range(model.config.n_layer):
        for module in GPT2_LORA_MODULES:
            fan_in, fan_out = shapes[module]
            a = torch.randn(fan_in, rank, generator=generator) * 0.05
            b = torch.randn(rank, fan_out, generator=generator) * 0.05
            weights[(layer, module)] = LoRAWeights(a, b, 2.0)
    return LoRAAdapter(name, "-", rank, weights)


def small_adapter(name: str, rank: int, seed: int, modules: tuple[str, ...]) -> LoRAAdapter:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(2):
        for module in modules:
            a = torch.randn(16, rank, generator=generator, dtype=torch.float64)
            b = torch.randn(rank, 24, generator=generator, dtype=torch.float64)
            weights[(layer, module)] = LoRAWeights(a, b, 0.5 + seed)
    return LoRAAdapter(name, "-", rank, weights)


def test_stacked_update_equals_per_adapter_update() -> None:
    """Three adapters of different ranks and targets and base rows in one step: the stacked
    update (two matmuls for all adapters) equals the per-adapter one to float64 rounding,
    base rows untouched, and a module no present adapter targets is left alone."""
    poem = small_adapter("poem", 4, 1, ("attn.c_attn", "mlp.c_fc"))
    chat = small_adapter("chat", 8, 2, ("attn.c_attn",))
    wide = small_adapter("wide", 2, 3, ("attn.c_attn", "mlp.c_fc"))
    rows = [poem, None, chat, chat, wide, None, poem, wide, poem]
    x = torch.randn(len(rows), 16, dtype=torch.float64)
    y = torch.randn(len(rows), 24, dtype=torch.float64)
    step = StepLoRA.build(rows, "cpu")
    assert step is not None and len(step.adapters) == 3
    for layer, module in ((0, "attn.c_attn"), (1, "mlp.c_fc"), (1, "attn.c_proj")):
        stacked = step.add(y.clone(), x, layer, module)
        expected = add_lora(y.clone(), x, plan_lora_rows(rows, "cpu"), layer, module)
        torch.testing.assert_close(stacked, expected, rtol=1e-13, atol=1e-13)
        assert torch.equal(stacked[[1, 5]], y[[1, 5]])  # base rows
    assert torch.equal(step.add(y.clone(), x, 0, "mlp.c_proj"), y)  # no adapter targets it
    assert not torch.equal(step.add(y.clone(), x, 0, "attn.c_attn"), y)


@pytest.fixture(scope="module")
def model() -> PagedGPT2:
    model = PagedGPT2.from_hf(random_gpt2(VOCAB, 1), batch_invariant="on")
    assert model.is_batch_invariant()
    return model


def logits_of(
    model: PagedGPT2, chunks: list[SeqChunk], adapters: list[LoRAAdapter | None], target: int
) -> torch.Tensor:
    cache = KVCache.allocate(model.config, 64, BLOCK, torch.float32)
    step = build_step_input(
        chunks,
        BLOCK,
        max_positions=N_POSITIONS,
        paged_decode=model.paged_decode,
        paged_chunk_tokens=model.paged_chunk_tokens,
    )
    rows = chain.from_iterable(
        repeat(a, len(c.token_ids)) for c, a in zip(chunks, adapters, strict=True)
    )
    step.lora = StepLoRA.build(rows, "cpu")
    logits = model(step, cache)
    first = sum(step.logits_counts[:target])
    return logits[first : first + step.logits_counts[target]]


@needs_native
def test_adapter_rows_equal_alone_and_in_a_mixed_step(model: PagedGPT2) -> None:
    rng = random.Random(0)
    poem = random_adapter("poem", model, 8, 1)
    chat = random_adapter("chat", model, 4, 2)
    tables = [[i * 4 + j for j in range(4)] for i in range(6)]

    def chunk(i: int, n: int) -> SeqChunk:
        return SeqChunk([rng.randrange(VOCAB) for _ in range(n)], 0, tables[i], all_logits=True)

    target = chunk(0, 21)
    alone = logits_of(model, [target], [poem], 0)
    base = logits_of(model, [target], [None], 0)
    assert not torch.equal(alone, base)  # the adapter changes the logits
    others = [chunk(1, 7), chunk(2, 1), chunk(3, 30), chunk(4, 3)]
    mixed = logits_of(
        model, [others[0], others[1], target, *others[2:]], [None, chat, poem, poem, None], 2
    )
    assert torch.equal(mixed, alone)
    # Without adapters the step carries no plan: the plain path, the base logits.
    assert plan_lora_rows([None, None], "cpu") == [] and StepLoRA.build([None], "cpu") is None
    assert torch.equal(logits_of(model, [target, others[0]], [None, None], 0), base)
