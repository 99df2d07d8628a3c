"""The padded fixed-shape decode (what CUDA graphs capture), run eagerly on CPU.

In float64 its logits equal the varlen forward's (< 1e-12) for random batches with mixed
context lengths; padding rows write only the scratch block; steps off the ladder fall back;
and an engine with the padded path gives exactly the tokens of one without it.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from app.engine.core.scheduler import ScheduledSeq, SchedulerOutput
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.model_runner import ModelRunner
from app.modeling import gpt2
from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.cuda_graphs import DecodeGraphs
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.static_decode import DecodeShape, batch_ladder, context_buckets
from tests.unit.test_engine import PROMPTS, run_all
from tests.unit.triton_interpret import needs_interpreter

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, N_POSITIONS, BLOCK = 300, 128, 4
NUM_BLOCKS = 520  # managed blocks (16 full-length tables); block NUM_BLOCKS is the scratch block
SCRATCH = NUM_BLOCKS


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(7)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=N_POSITIONS, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    m = GPT2LMHeadModel(cfg).eval().double()
    with torch.no_grad():  # larger weights: attention far from uniform
        for p in m.parameters():
            p.mul_(3.0)
    return m


def random_cache(model: GPT2LMHeadModel, seed: int) -> KVCache:
    """Random finite K/V in every block (what earlier steps would have written)."""
    kv = KVCache.allocate(model.config, NUM_BLOCKS + 1, BLOCK, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    for t in (*kv.keys, *kv.values):
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64))
    return kv


def clone(kv: KVCache) -> KVCache:
    return KVCache([k.clone() for k in kv.keys], [v.clone() for v in kv.values], BLOCK)


def random_decodes(rng: random.Random, n: int, sample_all: bool = True) -> list[SeqChunk]:
    """n one-token chunks with mixed context lengths over disjoint shuffled blocks."""
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    seqs = []
    for i in range(n):
        ctx = rng.choice([1, BLOCK, BLOCK + 1, rng.randint(1, N_POSITIONS)])
        table = [free.pop() for _ in range(-(-ctx // BLOCK))]
        sample = sample_all or i % 3 != 1
        seqs.append(SeqChunk([rng.randrange(VOCAB)], ctx - 1, table, sample))
    return seqs


def written_slots(seqs: list[SeqChunk]) -> list[int]:
    return [s.block_table[s.start_pos // BLOCK] * BLOCK + s.start_pos % BLOCK for s in seqs]


def assert_only_new_slots_written(
    seqs: list[SeqChunk], before: KVCache, eager_kv: KVCache, padded_kv: KVCache
) -> None:
    """The padded step changed only the new tokens' slots and the scratch block, and those
    slots hold the same K/V as the varlen forward (``eager_kv``) wrote."""
    slots = torch.tensor(written_slots(seqs))
    scratch = slice(SCRATCH * BLOCK, (SCRATCH + 1) * BLOCK)
    for new, old, ref in zip(
        (*padded_kv.keys, *padded_kv.values),
        (*before.keys, *before.values),
        (*eager_kv.keys, *eager_kv.values),
        strict=True,
    ):
        assert (new[slots] - ref[slots]).abs().max().item() < 1e-12
        untouched = torch.ones(new.shape[0], dtype=torch.bool)
        untouched[slots] = False
        untouched[scratch] = False
        assert torch.equal(new[untouched], old[untouched])


def test_ladders() -> None:
    assert batch_ladder(256) == [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256]
    assert batch_ladder(5) == [1, 2, 4, 5]
    assert batch_ladder(100_000)[-1] == 512
    assert batch_ladder(1) == [1]
    assert context_buckets(64) == [8, 16, 32, 64]
    assert context_buckets(40) == [8, 16, 32, 40]
    assert context_buckets(3) == [3]


@pytest.mark.parametrize(("n", "seed", "sample_all"), [(1, 0, True), (3, 1, True), (7, 2, False),
                                                       (13, 3, True), (16, 4, False)])  # fmt: skip
def test_padded_decode_equals_varlen_forward(
    model: GPT2LMHeadModel, n: int, seed: int, sample_all: bool
) -> None:
    rng = random.Random(seed)
    paged = PagedGPT2.from_hf(model)
    seqs = random_decodes(rng, n, sample_all)
    before = random_cache(model, seed)
    eager_kv, padded_kv = clone(before), clone(before)
    graphs = DecodeGraphs(paged, padded_kv, max_num_seqs=16, scratch_block=SCRATCH)
    shape = graphs.shape_for(seqs)
    assert shape is not None and shape.batch_size >= n
    expected = paged(build_step_input(seqs, BLOCK), eager_kv)
    got = graphs.run(shape, graphs.prepare(seqs, shape))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-12

    # Only the new tokens' slots and the scratch block changed; those slots hold the same
    # K/V as the varlen forward wrote.
    assert_only_new_slots_written(seqs, before, eager_kv, padded_kv)


def test_padding_rows_write_only_the_scratch_block(model: GPT2LMHeadModel) -> None:
    paged = PagedGPT2.from_hf(model)
    before = random_cache(model, 9)
    kv = clone(before)
    graphs = DecodeGraphs(paged, kv, max_num_seqs=16, scratch_block=SCRATCH)
    seqs = random_decodes(random.Random(9), 5)
    shape = graphs.shape_for(seqs)
    assert shape is not None and shape.batch_size == 8
    graphs.run(shape, graphs.prepare(seqs, shape))
    changed = {
        int(slot)
        for t, old in zip((*kv.keys, *kv.values), (*before.keys, *before.values), strict=True)
        for slot in torch.nonzero((t != old).any(dim=(1, 2))).flatten()
    }
    assert {s for s in changed if s // BLOCK != SCRATCH} <= set(written_slots(seqs))
    assert SCRATCH * BLOCK in changed  # the three padding rows wrote there
    assert all(torch.isfinite(t).all() for t in (*kv.keys, *kv.values))


def test_steps_off_the_ladder_fall_back(model: GPT2LMHeadModel) -> None:
    paged = PagedGPT2.from_hf(model)
    kv = random_cache(model, 0)
    graphs = DecodeGraphs(paged, kv, 4, SCRATCH, batch_sizes=[1, 2], context_blocks=[2, 4])
    one = SeqChunk([5], 3, [0])
    assert graphs.shape_for([one]) == DecodeShape(1, 2)
    assert graphs.shape_for([one, SeqChunk([5], 9, [1, 2, 3])]) == DecodeShape(2, 4)
    assert graphs.shape_for([one] * 3) is None  # more sequences than the largest batch
    assert graphs.shape_for([SeqChunk([5], 16, [0, 1, 2, 3, 4])]) is None  # context > 4 blocks
    assert graphs.shape_for([SeqChunk([5, 6], 0, [0])]) is None  # a prefill chunk
    assert graphs.shape_for([SeqChunk([5], 4, [0])]) is None  # table too short: eager raises
    assert graphs.shape_for([]) is None
    full = DecodeGraphs(paged, kv, 4, SCRATCH)
    assert full.shape_for([SeqChunk([5], N_POSITIONS - 1, list(range(32)))]) == DecodeShape(1, 32)
    assert full.shape_for([SeqChunk([5], N_POSITIONS, list(range(33)))]) is None  # too long
    with pytest.raises(ValueError, match="scratch block"):
        DecodeGraphs(paged, kv, 4, NUM_BLOCKS + 1)


def test_model_runner_routes_only_fitting_steps(model: GPT2LMHeadModel) -> None:
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK, max_num_seqs=8, static_decode=True)
    assert runner.kv_cache.num_blocks == NUM_BLOCKS + 1 and runner.num_decode_graphs == 0
    graphs = runner.decode_graphs
    assert graphs is not None
    prefill = ScheduledSeq(0, "a", [3, 4, 5, 6, 7], 0, [0, 1], True)
    runner.execute(SchedulerOutput([prefill]))
    assert graphs.num_padded_steps == 0
    decode = ScheduledSeq(0, "a", [8], 5, [0, 1], True)
    logits = runner.execute(SchedulerOutput([decode]))
    assert graphs.num_padded_steps == 1 and logits.shape == (1, VOCAB)
    mixed = [ScheduledSeq(0, "a", [9], 6, [0, 1], True), ScheduledSeq(1, "b", [3, 4], 0, [2], True)]
    runner.execute(SchedulerOutput(mixed))
    assert graphs.num_padded_steps == 1
    plain = ModelRunner(model, NUM_BLOCKS, BLOCK)  # CPU default: no padded path, no scratch
    assert plain.decode_graphs is None and plain.kv_cache.num_blocks == NUM_BLOCKS


JOBS: list[dict[str, Any]] = [
    {"max_new_tokens": 14},
    {"max_new_tokens": 9, "do_sample": True, "seed": 3},
    {"max_new_tokens": 11},
    {"max_new_tokens": 8, "num_return_sequences": 2, "do_sample": True, "seed": 5},
    {"max_new_tokens": 10, "prompt_lookup_num_tokens": 3},  # steps with drafts fall back
]


def test_engine_tokens_equal_with_and_without_padded_decode(tiny_model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = list(zip([*prompts, prompts[2]], JOBS, strict=True))
    results = {}
    for static in (False, True):
        config = EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=16)
        config.static_decode = static
        engine = LLMEngine(tiny_model, tiny_tokenizer, config)
        results[static] = run_all(engine, jobs)  # asserts every KV block is free at the end
        graphs = engine.runner.decode_graphs
        assert (graphs is not None and graphs.num_padded_steps > 0) == static
        assert engine.spec.num_draft_tokens > 0
    assert results[True] == results[False]
    assert all(len(tokens) > 0 for tokens in results[True].values())


# -- the Triton paged attention (CUDA's decode attention), through Triton's interpreter ------


@pytest.fixture
def triton_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models resolve the Triton kernel on CPU, as on CUDA (its kernels run interpreted),
    unless native_kernels=off: the torch-only path to compare with."""
    needs_interpreter()

    def resolve(native_kernels: str, *args: object) -> str | None:
        return None if native_kernels == "off" else "triton"

    monkeypatch.setattr(gpt2, "resolve_decode_kernel", resolve)


@pytest.mark.usefixtures("triton_decode")
@pytest.mark.parametrize(("n", "seed"), [(1, 0), (7, 2), (16, 4)])
def test_paged_decode_with_the_triton_kernel_equals_the_torch_forward(
    model: GPT2LMHeadModel, n: int, seed: int
) -> None:
    """One context bucket (graphs per batch size only), no gather buffers; logits equal the
    gather + SDPA varlen forward's, and only the new tokens' slots and the scratch block
    are written."""
    paged = PagedGPT2.from_hf(model)
    assert paged.decode_kernel() == "triton"
    torch_path = PagedGPT2.from_hf(model, native_kernels="off")
    assert torch_path.decode_kernel() is None
    seqs = random_decodes(random.Random(seed), n, sample_all=seed != 2)
    before = random_cache(model, seed)
    eager_kv, padded_kv = clone(before), clone(before)
    graphs = DecodeGraphs(paged, padded_kv, max_num_seqs=16, scratch_block=SCRATCH)
    assert graphs.paged_attention and graphs.context_blocks == [N_POSITIONS // BLOCK]
    assert graphs.shapes == [DecodeShape(bs, N_POSITIONS // BLOCK) for bs in (16, 8, 4, 2, 1)]
    assert graphs.buffers.k_gather.numel() == 0
    shape = graphs.shape_for(seqs)
    assert shape is not None
    expected = torch_path(build_step_input(seqs, BLOCK), eager_kv)
    got = graphs.run(shape, graphs.prepare(seqs, shape))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-12
    assert_only_new_slots_written(seqs, before, eager_kv, padded_kv)


@pytest.mark.usefixtures("triton_decode")
def test_varlen_forward_with_the_triton_kernel_equals_the_torch_forward(
    model: GPT2LMHeadModel,
) -> None:
    """A mixed step (decodes, a short continued chunk and a long one, a fresh prompt): the
    Triton kernel takes the single tokens and short chunks row by row (paged_decode)."""
    paged = PagedGPT2.from_hf(model)
    assert paged.paged_decode
    rng = random.Random(11)
    decodes = random_decodes(rng, 5)
    used = {b for s in decodes for b in s.block_table}
    free = [b for b in range(NUM_BLOCKS) if b not in used]
    seqs = [
        *decodes,
        SeqChunk([3, 4, 5], 9, free[:3]),  # a short chunk after 9 cached tokens
        SeqChunk(list(range(20, 90)), 30, free[3:28]),  # 70 tokens: SDPA
        SeqChunk([7, 8, 9, 10], 0, free[28:29]),  # a fresh prompt
    ]
    before = random_cache(model, 11)
    kv_triton, kv_torch = clone(before), clone(before)
    step = build_step_input(seqs, BLOCK, paged_decode=True)
    assert step.paged_decode is not None and len(step.prefills) == 1
    got = paged(step, kv_triton)
    torch_path = PagedGPT2.from_hf(model, native_kernels="off")
    expected = torch_path(build_step_input(seqs, BLOCK), kv_torch)
    assert (got - expected).abs().max().item() < 1e-12


@pytest.mark.usefixtures("triton_decode")
def test_engine_tokens_equal_with_the_triton_kernel(tiny_model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The CUDA configuration on CPU: every decode through the padded step with the Triton
    kernel (one graph shape per batch size), other steps' single tokens and short chunks
    through it too; tokens equal those of the torch-only engine."""
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    # JOBS, shorter: the interpreter runs every kernel program in Python.
    short = [{**job, "max_new_tokens": 5} for job in JOBS]
    jobs = list(zip([*prompts, prompts[2]], short, strict=True))
    config = EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=16)
    config.static_decode = True
    engine = LLMEngine(tiny_model, tiny_tokenizer, config)
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.paged_attention and len(graphs.context_blocks) == 1
    with_triton = run_all(engine, jobs)
    assert graphs.num_padded_steps > 0
    config = EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=16)
    config.native_kernels = "off"
    plain = LLMEngine(tiny_model, tiny_tokenizer, config)
    assert not plain.runner.model.paged_decode
    assert with_triton == run_all(plain, jobs)
