"""The native paged decode attention (app/modeling/native.py + csrc kernel)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

from app.config import Settings
from app.modeling import native
from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.native import (
    gelu_new_,
    load_kernels,
    paged_decode_attention,
    resolve_native_kernels,
)
from tests.unit.test_engine import make_engine, run_all

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(
    load_kernels()[0] is None, reason=f"native kernels unavailable: {load_kernels()[1]}"
)


def reference(q, k_cache, v_cache, tables, ctx, block_size, scale):  # type: ignore[no-untyped-def]
    """Per sequence: its slots gathered one by one, then float64 SDPA."""
    out = []
    for i, n in enumerate(ctx):
        slots = torch.tensor(
            [tables[i][p // block_size] * block_size + p % block_size for p in range(n)]
        )
        keys = k_cache[slots].transpose(0, 1).double()  # [H, n, hd]
        values = v_cache[slots].transpose(0, 1).double()
        o = F.scaled_dot_product_attention(q[i].double().unsqueeze(1), keys, values, scale=scale)
        out.append(o.squeeze(1))
    return torch.stack(out).float()


def run_case(seed: int, ctx: list[int], n_head: int, head_dim: int, block_size: int) -> None:
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(c + block_size - 1) // block_size for c in ctx]
    num_blocks = sum(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered, as in a real pool
    tables, at = [], 0
    for nb in blocks_per_seq:
        tables.append(perm[at : at + nb])
        at += nb
    width = max(blocks_per_seq) + 1  # one spare column: padded with the last id
    padded = torch.tensor([t + [t[-1]] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks * block_size, n_head, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    n, E = len(ctx), n_head * head_dim
    # q is a view of a fused qkv buffer (row stride 3E); the sequences sit on shuffled rows
    # among other rows (prefill tokens) that the kernel must leave alone.
    T = 2 * n + 1
    qkv = torch.randn(T, 3 * E, generator=g)
    q = qkv[:, :E].view(T, n_head, head_dim)
    rows = torch.randperm(T, generator=g)[:n]
    out = torch.full((T, n_head, head_dim), 7.0)
    scale = head_dim**-0.5
    paged_decode_attention(
        q,
        k_cache,
        v_cache,
        padded,
        torch.tensor(ctx, dtype=torch.int32),
        rows,
        out,
        block_size,
        max(ctx),
        scale,
    )
    want = reference(q[rows], k_cache, v_cache, tables, ctx, block_size, scale)
    torch.testing.assert_close(out[rows], want, rtol=2e-5, atol=2e-6)
    others = torch.ones(T, dtype=torch.bool)
    others[rows] = False
    assert (out[others] == 7.0).all()  # rows that are not decodes are never written


@needs_kernel
@pytest.mark.parametrize(
    "ctx",
    [[1], [15, 16, 17], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 3, 64, 33] * 3],
    ids=["one-token", "block-edges", "few-seqs", "many-seqs"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_sdpa(ctx: list[int], threads: int) -> None:
    """Few sequences split by head across threads, many by sequence: both paths, both
    thread counts, contexts on and across block edges."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_case(len(ctx), ctx, n_head=12, head_dim=64, block_size=16)
    finally:
        torch.set_num_threads(before)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    ctx=st.lists(st.integers(1, 70), min_size=1, max_size=12),
    n_head=st.sampled_from([1, 2, 4, 12]),
    head_dim=st.sampled_from([1, 8, 24, 64, 80]),
    block_size=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_sdpa_any_shape(
    ctx: list[int], n_head: int, head_dim: int, block_size: int, seed: int
) -> None:
    run_case(seed, ctx, n_head, head_dim, block_size)


@needs_kernel
def test_extreme_scores_stay_finite() -> None:
    """Scores far apart (exp underflow of all but one key) and large: no inf or NaN."""
    H, hd, B = 2, 8, 4
    k = torch.zeros(3 * B, H, hd)
    v = torch.randn(3 * B, H, hd)
    k[0] = 1000.0  # the first key dominates completely
    q = torch.ones(1, H, hd)
    out = torch.empty(1, H, hd)
    table = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    paged_decode_attention(
        q, k, v, table, torch.tensor([10], dtype=torch.int32), torch.tensor([0]), out, B, 10, 1.0
    )
    torch.testing.assert_close(out[0], v[0])


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=128, n_embd=48, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


@needs_kernel
@pytest.mark.parametrize("chunk_tokens", [64, 16, 1])
def test_paged_forward_native_equals_torch_and_transformers(chunk_tokens: int) -> None:
    """Prompt chunks, a continued chunk and decodes of several lengths: with the native
    kernels (attention, gelu_new) the logits match torch's ops and transformers' own, whether
    the chunks are attended row by row by the kernel (up to ``chunk_tokens`` tokens) or by
    SDPA."""
    model = tiny_gpt2()
    assert model.config.activation_function == "gelu_new"
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (9, 30, 17, 1, 40)]
    B = 4
    tables, next_block = [], 0
    for p in prompts:
        nb = (len(p) + B - 1) // B
        tables.append(list(range(next_block, next_block + nb))[::-1])  # reversed: scattered
        next_block += nb
    logits = {}
    for setting in ("on", "off"):
        paged = PagedGPT2.from_hf(model, native_kernels=setting)
        assert paged.uses_native() == (setting == "on")
        kv = KVCache.allocate(model.config, next_block, B, torch.float32)
        # Step 1: every prompt but its last token (the 1-token prompt: nothing yet).
        pairs = list(zip(prompts, tables, strict=True))
        first = [SeqChunk(p[:-1], 0, t, sample=False) for p, t in pairs if len(p) > 1]
        native = paged.paged_decode
        paged(
            build_step_input(first, B, "cpu", paged_decode=native, paged_chunk_tokens=chunk_tokens),
            kv,
        )
        # Step 2: one decode token each, except the 40-token prompt, which continues with a
        # 2-token chunk after rewinding one token (its last two tokens recomputed).
        second = [SeqChunk(p[-1:], len(p) - 1, t) for p, t in pairs[:4]]
        second.append(SeqChunk(prompts[4][-2:], 38, tables[4]))
        step = build_step_input(
            second, B, "cpu", paged_decode=native, paged_chunk_tokens=chunk_tokens
        )
        assert (step.paged_decode is not None) == (setting == "on")
        if setting == "on":  # 4 decodes, and the 2-token chunk row by row or by SDPA
            assert len(step.paged_decode.rows) == (6 if chunk_tokens >= 2 else 4)
            assert len(step.prefills) == (0 if chunk_tokens >= 2 else 1)
        logits[setting] = paged(step, kv)
    torch.testing.assert_close(logits["on"], logits["off"], rtol=1e-5, atol=1e-5)
    for row, p in enumerate(prompts):
        want = model(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits["on"][row], want, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_gelu_matches_transformers(threads: int) -> None:
    """In place, every magnitude (tails where exp underflows, both signs, exact 0), sizes
    below and above the threaded cut; float32 rounding of transformers' gelu_new."""
    g = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 7, 1000, 70_000):
            x = torch.randn(n, generator=g) * 4
            x[0] = 0.0
            if n > 3:
                x[1], x[2], x[3] = -100.0, 100.0, -9.0
            want = ACT2FN["gelu_new"](x.double())
            y = x.clone()
            assert gelu_new_(y) is y
            torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=1e-7)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="contiguous float32"):
        gelu_new_(torch.zeros(4, dtype=torch.float64))


def test_auto_uses_them_only_for_float32_on_cpu() -> None:
    built = load_kernels()[0] is not None
    assert resolve_native_kernels("auto", CPU, torch.float32) == built
    assert not resolve_native_kernels("auto", CPU, torch.float64)
    assert not resolve_native_kernels("auto", torch.device("cuda"), torch.float16)
    assert not resolve_native_kernels("off", CPU, torch.float32)


def test_on_refused_where_they_do_not_apply() -> None:
    with pytest.raises(ValueError, match="float32 on CPU only"):
        resolve_native_kernels("on", CPU, torch.float64)
    with pytest.raises(ValueError, match="native_kernels must be"):
        resolve_native_kernels("yes", CPU, torch.float32)
    with pytest.raises(ValidationError, match="native_kernels"):
        Settings(native_kernels="yes")  # type: ignore[arg-type]


def test_float64_forward_refuses_a_paged_decode_step() -> None:
    model = tiny_gpt2().double()
    paged = PagedGPT2.from_hf(model)
    assert not paged.paged_decode
    kv = KVCache.allocate(model.config, 2, 4, torch.float64)
    step = build_step_input([SeqChunk([5], 3, [1])], 4, "cpu", paged_decode=True)
    with pytest.raises(ValueError, match="needs the native kernels"):
        paged(step, kv)


def test_without_a_compiler_auto_falls_back_and_on_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.load_kernels.cache_clear()
    try:
        lib, why = load_kernels()
        assert lib is None and "no C compiler" in why
        with caplog.at_level(logging.WARNING, logger="kogpt.native"):
            assert not resolve_native_kernels("auto", CPU, torch.float32)
        assert "native kernels off, torch ops only" in caplog.text
        with pytest.raises(ValueError, match="unavailable: no C compiler"):
            resolve_native_kernels("on", CPU, torch.float32)
    finally:
        monkeypatch.delenv("CC")
        native.load_kernels.cache_clear()


@needs_kernel
def test_a_broken_build_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A compiler error names the compiler and its message; the cache stays clean."""
    (tmp_path / "bad.c").write_text("this is not C\n")
    monkeypatch.setattr(native, "CSRC", tmp_path)
    monkeypatch.setenv("KOGPT_NATIVE_CACHE", str(tmp_path / "cache"))
    native.load_kernels.cache_clear()
    try:
        lib, why = load_kernels()
        assert lib is None and "building the native kernels failed" in why and "error" in why
        assert list((tmp_path / "cache").iterdir()) == []  # no half-built library left
    finally:
        native.load_kernels.cache_clear()


@needs_kernel
def test_engine_greedy_native_equals_torch(tiny_model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """float32 engine runs (decodes of many lengths, chunked prompts, prefix hits) give the
    same greedy tokens with and without the native kernels, and free every block."""
    model = copy.deepcopy(tiny_model).float()  # the fixture is float64
    prompts = [tiny_tokenizer(p)["input_ids"] for p in ("대한민국은", "모든 국민은 " * 6, "a b")]
    jobs = [(p, {"max_new_tokens": 12, "min_new_tokens": 12}) for p in prompts * 2]
    got = {}
    for setting in ("on", "off"):
        engine = make_engine(model, tiny_tokenizer, native_kernels=setting)
        assert engine.runner.model.uses_native() == (setting == "on")
        got[setting] = run_all(engine, jobs)  # asserts every KV block is free at the end
    assert got["on"] == got["off"]


def test_paged_layout_rows_and_contexts() -> None:
    """Each token of a short chunk is a row with its causal context; longer chunks stay SDPA
    prefills; tables are padded with their last id to the widest."""
    seqs = [
        SeqChunk([7, 8, 9], 5, [4, 2]),  # positions 5..7
        SeqChunk([1], 20, [0, 1]),  # a decode at position 20
        SeqChunk(list(range(10)), 0, [3, 5, 6]),  # longer than the cut: SDPA
    ]
    step = build_step_input(seqs, 16, "cpu", paged_decode=True, paged_chunk_tokens=4)
    pd = step.paged_decode
    assert pd is not None and pd.max_context == 21
    assert pd.rows.tolist() == [0, 1, 2, 3]
    assert pd.context_lens.tolist() == [6, 7, 8, 21]
    assert pd.block_tables.tolist() == [[4, 4], [4, 4], [4, 4], [0, 1]]  # blocks needed
    assert [(p.start, p.end) for p in step.prefills] == [(4, 14)] and not step.decode
