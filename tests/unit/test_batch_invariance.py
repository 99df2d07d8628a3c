"""Batch-invariant mode (app/modeling/batch_invariant.py): in float32 on CPU a request's
logits and log-probs are bit-identical whatever else the step holds and however its tokens
were scheduled (prefill chunks of any length, decodes, prefix-cache hits, recompute after a
preemption).

The model is a random 2-layer GPT-2 768 wide (12 heads): the MLP's 3072 -> 768 matmul is
where oneDNN's blocking follows the row count on an AVX-512 Xeon. Without the mode these
properties fail (the 1-row decode matmul, SDPA over long chunks); see docs/reproducibility.md.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from transformers import GPT2Config, GPT2LMHeadModel

from app.config import Settings
from app.engine.engine import EngineConfig, LLMEngine
from app.modeling import batch_invariant
from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.batch_invariant import (
    FALLBACK_TILE,
    RowInvariantLinear,
    probe_row_invariance,
    resolve_batch_invariant,
)
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.linear import AtenConv1D, MkldnnPacked, mkldnn_available
from app.modeling.native import load_kernels
from app.options.params import SamplingParams

pytestmark = pytest.mark.skipif(
    load_kernels()[0] is None, reason=f"native kernels unavailable: {load_kernels()[1]}"
)

BLOCK = 16
N_POSITIONS = 256
VOCAB = 3000  # the runner-level model's LM head: 768 x 3000
# Shrinking a failing schedule replays whole forwards for minutes; the failing example is
# printed as drawn (and hypothesis' database replays it first next time).
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]


def random_gpt2(vocab: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=768,
        n_head=12,
        vocab_size=vocab,
        n_positions=N_POSITIONS,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=3,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def invariant_model() -> PagedGPT2:
    model = PagedGPT2.from_hf(random_gpt2(VOCAB, 0), batch_invariant="on")
    assert model.is_batch_invariant()
    return model


# --- the model runner's level: one target sequence under many schedules ------------------


@dataclass
class Schedule:
    """How the target's tokens are computed: chunk lengths (1 = a decode), each chunk in a
    step with other sequences' chunks; optionally its first blocks come from another
    sequence's prefix-cache hit, and optionally it is preempted (its blocks dropped) after a
    number of chunks and recomputed from position 0 with other chunk lengths."""

    chunks: list[int]
    companions: list[list[tuple[int, int]]]  # per chunk: (new tokens, start_pos) of others
    target_index: list[int]  # per chunk: the target's place among the step's sequences
    prefix_hit_blocks: int = 0
    donor_chunks: list[int] = field(default_factory=list)  # the donor's chunking of the prefix
    preempt_after: int | None = None
    recompute_chunks: list[int] = field(default_factory=list)


class Pool:
    """A KV cache: blocks handed to the target (and its donor) once, and scratch blocks that
    every step's other sequences reuse (their stale data is their cached past)."""

    def __init__(self, model: PagedGPT2, num_blocks: int, scratch: int) -> None:
        self.cache = KVCache.allocate(model.config, num_blocks + scratch, BLOCK, torch.float32)
        ids = list(range(num_blocks + scratch))
        random.Random(num_blocks).shuffle(ids)  # scattered tables, as a real pool
        self.free, self.scratch = ids[:num_blocks], ids[num_blocks:]

    def take(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        assert len(taken) == n, "test pool too small"
        return taken


def run_step(
    model: PagedGPT2, pool: Pool, chunks: list[SeqChunk], target: int
) -> torch.Tensor | None:
    step = build_step_input(
        chunks,
        BLOCK,
        max_positions=N_POSITIONS,
        paged_decode=model.paged_decode,
        paged_chunk_tokens=model.paged_chunk_tokens,
    )
    logits = model(step, pool.cache)
    if not chunks[target].all_logits:
        return None
    first = sum(step.logits_counts[:target])
    return logits[first : first + step.logits_counts[target]]


def companion_chunks(pool: Pool, rng: random.Random, spec: list[tuple[int, int]]) -> list[SeqChunk]:
    """Other sequences' chunks: random tokens over blocks of their own (their cached past is
    whatever those blocks hold: finite, and never the target's)."""
    sizes = [-(-(start + n) // BLOCK) for n, start in spec]
    blocks = rng.sample(pool.scratch, sum(sizes))  # disjoint tables
    out = []
    for (n, start), size in zip(spec, sizes, strict=True):
        tokens = [rng.randrange(VOCAB) for _ in range(n)]
        table, blocks = blocks[:size], blocks[size:]
        out.append(SeqChunk(tokens, start, table, sample=rng.random() < 0.7))
    return out


def compute_sequence(
    model: PagedGPT2,
    pool: Pool,
    tokens: list[int],
    chunks: list[int],
    start: int,
    table: list[int],
    rng: random.Random,
    companions: list[list[tuple[int, int]]] | None = None,
    places: list[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Positions start.. of ``tokens`` chunk by chunk; logits row per position computed."""
    rows: dict[int, torch.Tensor] = {}
    pos = start
    for c, n in enumerate(chunks):
        mine = SeqChunk(tokens[pos : pos + n], pos, table, all_logits=True)
        others = companion_chunks(pool, rng, companions[c]) if companions else []
        place = min(places[c], len(others)) if places else 0
        step = [*others[:place], mine, *others[place:]]
        got = run_step(model, pool, step, place)
        assert got is not None
        for r in range(n):
            rows[pos + r] = got[r].clone()
        pos += n
    return rows


def split(total: int, draw: Any, most: int) -> list[int]:
    """``total`` tokens as a drawn list of chunk lengths (1 = decode) of at most ``most``."""
    out = []
    while total:
        n = draw(st.integers(1, min(total, most)))
        out.append(n)
        total -= n
    return out


@st.composite
def schedules(draw: Any, length: int) -> Schedule:
    chunks = split(length, draw, draw(st.sampled_from([1, 8, 80, length])))
    companion = st.lists(
        st.tuples(st.sampled_from([1, 1, 1, 2, 5, 17, 70]), st.integers(0, 120)), max_size=5
    )
    hit = draw(st.integers(0, (length - 1) // BLOCK))
    schedule = Schedule(
        chunks=chunks,
        companions=[draw(companion) for _ in chunks],
        target_index=[draw(st.integers(0, 4)) for _ in chunks],
    )
    if hit:  # the target starts after `hit` cached blocks; the chunks cover the rest
        schedule.prefix_hit_blocks = hit
        schedule.donor_chunks = split(hit * BLOCK, draw, draw(st.sampled_from([1, 16, 64])))
        schedule.chunks = split(length - hit * BLOCK, draw, draw(st.sampled_from([1, 8, 80])))
        schedule.companions = [draw(companion) for _ in schedule.chunks]
        schedule.target_index = [draw(st.integers(0, 4)) for _ in schedule.chunks]
    elif len(chunks) > 1 and draw(st.booleans()):
        after = draw(st.integers(1, len(chunks) - 1))
        schedule.preempt_after = after
        schedule.recompute_chunks = split(sum(chunks[:after]), draw, 256)
    return schedule


def target_rows(model: PagedGPT2, tokens: list[int], schedule: Schedule, seed: int):  # type: ignore[no-untyped-def]
    """The target's logits per position under ``schedule``: a prefix hit's positions from the
    donor that computed them, every other row from the target's own chunks (after a
    preemption, the rows before it, each checked against its recomputed row)."""
    rng = random.Random(seed)
    pool = Pool(model, 32, 5 * 12)
    need = -(-len(tokens) // BLOCK)
    start = schedule.prefix_hit_blocks * BLOCK
    before: dict[int, torch.Tensor] = {}
    if start:  # a donor with the same prefix computed it (its own chunking, alone)
        donor = pool.take(need)
        before = compute_sequence(model, pool, tokens[:start], schedule.donor_chunks, 0, donor, rng)
        table = donor[: schedule.prefix_hit_blocks] + pool.take(need - schedule.prefix_hit_blocks)
    else:
        table = pool.take(need)
    chunks = schedule.chunks
    if schedule.preempt_after is not None:
        first = chunks[: schedule.preempt_after]
        before = compute_sequence(
            model, pool, tokens, first, 0, table, rng, schedule.companions, schedule.target_index
        )
        table = pool.take(need)  # recompute into fresh blocks, other chunk lengths
        recomputed = compute_sequence(model, pool, tokens, schedule.recompute_chunks, 0, table, rng)
        for pos, row in before.items():
            assert torch.equal(row, recomputed[pos]), f"recompute changed position {pos}"
        start = sum(first)
        chunks = chunks[schedule.preempt_after :]
    rows = compute_sequence(
        model,
        pool,
        tokens,
        chunks,
        start,
        table,
        rng,
        schedule.companions[-len(chunks) :],
        schedule.target_index[-len(chunks) :],
    )
    return {**before, **rows}


def solo_rows(model: PagedGPT2, tokens: list[int], prompt_len: int) -> dict[int, torch.Tensor]:
    """The request alone: its prompt in one chunk, then one decode step per token."""
    pool = Pool(model, 12, 0)
    table = pool.take(-(-len(tokens) // BLOCK))
    chunks = [prompt_len] + [1] * (len(tokens) - prompt_len)
    return compute_sequence(model, pool, tokens, chunks, 0, table, random.Random(0))


def assert_same_rows(got: dict[int, torch.Tensor], want: dict[int, torch.Tensor]) -> None:
    differing = [p for p in sorted(got) if not torch.equal(got[p], want[p])]
    assert not differing, (
        f"logits differ from the solo run at positions {differing} (max |diff| "
        f"{max(float((got[p] - want[p]).abs().max()) for p in differing):.3g})"
    )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=NO_SHRINK,
)
@given(data=st.data(), prompt_len=st.integers(1, 90), new=st.integers(1, 24))
def test_target_logits_equal_its_solo_run_under_any_schedule(
    invariant_model: PagedGPT2, data: st.DataObject, prompt_len: int, new: int
) -> None:
    tokens = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=prompt_len + new,
                                max_size=prompt_len + new))  # fmt: skip
    schedule = data.draw(schedules(len(tokens)))
    want = solo_rows(invariant_model, tokens, prompt_len)
    got = target_rows(invariant_model, tokens, schedule, seed=prompt_len * 100 + new)
    assert sorted(got) == sorted(want)
    assert_same_rows(got, want)


# --- the engine's level: token ids and log-probs of a request alone and under load ---------


@pytest.fixture(scope="module")
def engine_model(tiny_tokenizer) -> GPT2LMHeadModel:  # type: ignore[no-untyped-def]
    return random_gpt2(len(tiny_tokenizer), 1)


Token = tuple[int, float | None, list[tuple[int, float]]]


def run_engine(
    model: GPT2LMHeadModel,
    tokenizer: Any,
    jobs: list[tuple[list[int], SamplingParams]],
    mode: str = "on",
    **config: Any,
) -> tuple[dict[str, list[Token]], dict[str, int]]:
    """Each request's (token, log-prob, top alternatives) and its number of preemptions."""
    config = {"num_blocks": 256, "block_size": BLOCK, "batch_invariant": mode, **config}
    engine = LLMEngine(model, tokenizer, EngineConfig(**config))
    assert engine.runner.model.is_batch_invariant() == (mode == "on")
    for i, (prompt, params) in enumerate(jobs):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[Token]] = {}
    preemptions: dict[str, int] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for token in out.outputs[0].tokens:
                tokens.setdefault(out.request_id, []).append((token.id, token.logprob, token.top))
            preemptions[out.request_id] = out.num_preemptions
    return tokens, preemptions


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=NO_SHRINK,
)
@given(
    seed=st.integers(0, 2**16),
    others=st.integers(3, 24),
    budget=st.sampled_from([32, 64, 2048]),
    tight=st.booleans(),
)
def test_engine_logprobs_equal_alone_and_under_load(
    engine_model: GPT2LMHeadModel,
    tiny_tokenizer: Any,
    seed: int,
    others: int,
    budget: int,
    tight: bool,
) -> None:
    """A greedy request with log-probs and top-5, and a seeded sampled one: alone, then among
    ``others`` requests (some sharing its prefix: cache hits; sampled and greedy; a token
    budget that chunks prompts; a pool small enough to preempt when ``tight``)."""
    rng = random.Random(seed)
    vocab = len(tiny_tokenizer)
    prompt = [rng.randrange(4, vocab) for _ in range(rng.randrange(20, 100))]
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True, top_n_tokens=5)
    sampled = SamplingParams(
        max_new_tokens=16, ignore_eos=True, do_sample=True, top_k=40, seed=seed, top_n_tokens=3
    )
    targets = [(prompt, greedy), ([*prompt[: len(prompt) // 2], 5, 6, 7], sampled)]
    alone = {
        i: run_engine(engine_model, tiny_tokenizer, [job])[0]["r0"] for i, job in enumerate(targets)
    }
    load = []
    for j in range(others):
        if j % 3 == 0:  # shares the target's prefix: prefix-cache hits
            other = [*prompt[: rng.randrange(1, len(prompt))], rng.randrange(4, vocab)]
        else:
            other = [rng.randrange(4, vocab) for _ in range(rng.randrange(1, 120))]
        load.append(
            (
                other,
                SamplingParams(
                    max_new_tokens=rng.randrange(1, 30),
                    ignore_eos=True,
                    do_sample=j % 2 == 1,
                    seed=j,
                ),
            )
        )
    # The targets sit in the middle of the load, admitted after part of it.
    jobs = load[: others // 2] + targets + load[others // 2 :]
    blocks = 60 if tight else 512
    got, _ = run_engine(
        engine_model, tiny_tokenizer, jobs, num_blocks=blocks, max_num_batched_tokens=budget
    )
    first = others // 2
    for i in range(len(targets)):
        assert got[f"r{first + i}"] == alone[i], f"target {i} differs under load"


def test_engine_preempted_request_equals_alone(
    engine_model: GPT2LMHeadModel, tiny_tokenizer: Any
) -> None:
    """The newest request is preempted (a pool too small for all), recomputed in a prefill
    chunk of its prompt and generated tokens: its log-probs equal its solo run's."""
    rng = random.Random(7)
    vocab = len(tiny_tokenizer)
    load = [
        (
            [rng.randrange(4, vocab) for _ in range(48)],
            SamplingParams(max_new_tokens=40, ignore_eos=True, logprobs=False),
        )
        for _ in range(4)
    ]
    target = (
        [rng.randrange(4, vocab) for _ in range(32)],
        SamplingParams(max_new_tokens=32, ignore_eos=True, top_n_tokens=3),
    )
    alone, _ = run_engine(engine_model, tiny_tokenizer, [target])
    got, preemptions = run_engine(
        engine_model, tiny_tokenizer, [*load, target], num_blocks=20, max_num_batched_tokens=64
    )
    assert preemptions["r4"] > 0
    assert got["r4"] == alone["r0"], "the preempted request differs from its solo run"


# --- the pieces --------------------------------------------------------------------------


def test_resolve_batch_invariant_applies_to_float32_cpu_with_native_kernels() -> None:
    cpu = torch.device("cpu")
    assert resolve_batch_invariant("auto", cpu, torch.float32, "none", native=True)
    assert not resolve_batch_invariant("auto", cpu, torch.float64, "none", native=True)
    assert not resolve_batch_invariant("auto", cpu, torch.float32, "int8", native=True)
    assert not resolve_batch_invariant("auto", cpu, torch.float32, "none", native=False)
    assert not resolve_batch_invariant("off", cpu, torch.float32, "none", native=True)
    with pytest.raises(ValueError, match="int8"):
        resolve_batch_invariant("on", cpu, torch.float32, "int8", native=True)
    with pytest.raises(ValueError, match="float32 on CPU"):
        resolve_batch_invariant("on", torch.device("cuda"), torch.bfloat16, "none", native=False)
    with pytest.raises(ValueError, match="native kernels"):
        resolve_batch_invariant("on", cpu, torch.float32, "none", native=False)


def test_engine_resolves_the_setting(tiny_tokenizer: Any) -> None:
    """auto: on for a float32 CPU engine, off with int8 or in float64; on: a start-up error
    where it cannot run; a bad value: a settings error naming the field."""
    with pytest.raises(ValidationError, match="batch_invariant"):
        Settings(batch_invariant="yes")  # type: ignore[arg-type]
    small = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer), n_positions=64)
    ).eval()

    def runner_model(model: GPT2LMHeadModel, **config: Any) -> PagedGPT2:
        engine = LLMEngine(model, tiny_tokenizer, EngineConfig(num_blocks=8, **config))
        return engine.runner.model

    assert Settings().batch_invariant == EngineConfig(num_blocks=1).batch_invariant == "auto"
    assert runner_model(small).is_batch_invariant()
    assert not runner_model(small, quantize="int8").is_batch_invariant()
    assert not runner_model(small, batch_invariant="off").is_batch_invariant()
    doubled = copy.deepcopy(small).double()
    assert not runner_model(doubled).is_batch_invariant()
    with pytest.raises(ValueError, match="float32 on CPU"):
        runner_model(doubled, batch_invariant="on")


@pytest.mark.parametrize("tile", [None, FALLBACK_TILE])
@pytest.mark.parametrize("backend", ["mkldnn", "aten"])
def test_row_invariant_linear_rows_equal_alone_and_in_any_batch(
    backend: str, tile: int | None
) -> None:
    """Each row of a 3072 -> 768 matmul (the shape where oneDNN's 1-row call differs) equals
    the same row computed alone, for every row count up to past ``max_rows`` (a split)."""
    if backend == "mkldnn" and not mkldnn_available():
        pytest.skip("oneDNN unavailable")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(768, 3072, generator=gen) * 0.02
    b = torch.randn(768, generator=gen)
    inner = MkldnnPacked(w, b) if backend == "mkldnn" else AtenConv1D(w.t().contiguous(), b)
    most = 128
    if tile is None and probe_row_invariance(inner, 3072, torch.float32, most) is None:
        pytest.skip(f"{backend} is shape-dependent on this CPU: the fixed tiles case covers it")
    lin = RowInvariantLinear(inner, 3072, tile, max_rows=most)
    x = torch.randn(most + 40, 3072, generator=gen)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(x.shape[0])])
    for n in [1, 2, 3, 7, 16, 17, 64, 100, most, most + 1, most + 40]:
        out = torch.empty(n, 768)
        assert torch.equal(lin(x[:n], out=out), alone[:n]), n
        assert torch.equal(out, alone[:n])


def test_shape_dependent_kernel_falls_back_to_fixed_tiles(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A kernel whose rows change with the call size (here: a 1-row call rounds otherwise)
    fails the probe and is then only ever called with FALLBACK_TILE rows."""
    weight = torch.randn(64, 32)
    sizes: list[int] = []

    def shape_dependent(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        sizes.append(x.shape[0])
        y = x @ weight.t()
        return y + 1e-3 if x.shape[0] % 3 == 0 else y

    assert probe_row_invariance(shape_dependent, 32, torch.float32) is None
    monkeypatch.setattr(batch_invariant, "_probed", {})
    lin = batch_invariant.row_invariant(shape_dependent, 32, 64, torch.float32)
    assert isinstance(lin, RowInvariantLinear) and lin.tile == FALLBACK_TILE
    sizes.clear()
    x = torch.randn(40, 32)
    rows = lin(x)
    assert set(sizes) == {FALLBACK_TILE}
    assert torch.equal(rows[5], lin(x[5:6])[0])
