"""Parity of the paged GPT-2 forward with transformers' GPT2LMHeadModel.

Every test runs the paged forward over a KV cache with shuffled block ids and compares
logits with HF's forward over the whole token sequence (no cache), in float64 (< 1e-9) and
float32 (< 1e-4), for block sizes 4 and 16.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache

VOCAB = 300
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DTYPES = [torch.float64, torch.float32]
BLOCK_SIZES = [4, 16]
MINI_DIR = Path(__file__).resolve().parents[2] / "models" / "kogpt2-mini"

_models: dict = {}
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only add overhead


def tiny_model(dtype: torch.dtype) -> GPT2LMHeadModel:
    if dtype not in _models:
        torch.manual_seed(1234)
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_positions=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=1,
        )
        model = GPT2LMHeadModel(cfg).eval()
        # Larger-than-init weights make attention patterns non-trivial (not near uniform).
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
        _models[dtype] = model.to(dtype)
    return _models[dtype]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def rand_ids(rng: random.Random, n: int, vocab: int = VOCAB) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


class Harness:
    """A paged model, its cache and a toy block allocator handing out shuffled block ids."""

    def __init__(self, model, block_size: int, num_blocks: int = 160, seed: int = 0):
        self.cap: int | str = "auto"  # decode_batch_tokens
        self.model = model
        self.pm = PagedGPT2.from_hf(model)
        self.B = block_size
        self.kv = KVCache.allocate(model.config, num_blocks, block_size, model.dtype, "cpu")
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def grow(self, table: list[int], n_tokens: int) -> list[int]:
        while len(table) * self.B < n_tokens:
            table.append(self.free.pop())
        return table

    def step(self, chunks: list[SeqChunk]) -> list[torch.Tensor]:
        """Run one forward; returns each chunk's logits rows ([0|1|n, vocab])."""
        step = build_step_input(chunks, self.B, "cpu", decode_batch_tokens=self.cap)
        out = self.pm(step, self.kv)
        assert out.shape == (sum(step.logits_counts), self.model.config.vocab_size)
        assert out.dtype == self.model.dtype
        return list(out.split(step.logits_counts))


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff < TOL[dtype], f"max abs diff {diff:.3e}"


params = pytest.mark.parametrize(
    ("dtype", "block_size"), [(d, b) for d in DTYPES for b in BLOCK_SIZES]
)


@params
def test_single_prompt_prefill(dtype, block_size):
    model = tiny_model(dtype)
    h = Harness(model, block_size)
    ids = rand_ids(random.Random(1), 23)
    (got,) = h.step([SeqChunk(ids, 0, h.grow([], 23), all_logits=True)])
    assert_close(got, hf_logits(model, ids), dtype)


@params
def test_batch_of_prompts(dtype, block_size):
    model = tiny_model(dtype)
    h = Harness(model, block_size)
    rng = random.Random(2)
    prompts = [rand_ids(rng, n) for n in (5, 1, 16, 17, 40, 2)]
    outs = h.step([SeqChunk(p, 0, h.grow([], len(p))) for p in prompts])
    for p, got in zip(prompts, outs, strict=True):
        assert_close(got[0], hf_logits(model, p)[-1], dtype)


@params
def test_chunked_prefill(dtype, block_size):
    model = tiny_model(dtype)
    h = Harness(model, block_size)
    ids = rand_ids(random.Random(3), 37)
    ref = hf_logits(model, ids)
    table: list[int] = []
    got, pos = [], 0
    for n in (10, 16, 11):  # chunk boundaries inside and on block edges
        chunk = SeqChunk(ids[pos : pos + n], pos, h.grow(table, pos + n), all_logits=True)
        got.append(h.step([chunk])[0])
        pos += n
    assert_close(torch.cat(got), ref, dtype)

    # Same prompt, last-token logits only (sample only on the final chunk).
    h2 = Harness(model, block_size, seed=9)
    table, pos = [], 0
    for n in (20, 17):
        last = pos + n == len(ids)
        (out,) = h2.step([SeqChunk(ids[pos : pos + n], pos, h2.grow(table, pos + n), sample=last)])
        assert out.shape[0] == (1 if last else 0)
        pos += n
    assert_close(out[0], ref[-1], dtype)


@params
def test_decode_mixed_with_prefill(dtype, block_size):
    model = tiny_model(dtype)
    h = Harness(model, block_size)
    rng = random.Random(4)
    a = rand_ids(rng, 12 + 6)  # 12 prompt tokens then 6 decoded ones (fixed, not argmax)
    b = rand_ids(rng, 30)
    c = rand_ids(rng, 9 + 4)
    ref_a, ref_b, ref_c = (hf_logits(model, x) for x in (a, b, c))
    ta, tb, tc = [], [], []

    (out,) = h.step([SeqChunk(a[:12], 0, h.grow(ta, 12))])
    assert_close(out[0], ref_a[11], dtype)
    # step 2: decode A + first chunk of B
    oa, ob = h.step(
        [SeqChunk([a[12]], 12, h.grow(ta, 13)), SeqChunk(b[:14], 0, h.grow(tb, 14), sample=False)]
    )
    assert_close(oa[0], ref_a[12], dtype)
    assert ob.shape[0] == 0
    # step 3: B's second chunk first in the batch, A decodes, C's whole prompt
    ob, oa, oc = h.step(
        [
            SeqChunk(b[14:], 14, h.grow(tb, 30), all_logits=True),
            SeqChunk([a[13]], 13, h.grow(ta, 14)),
            SeqChunk(c[:9], 0, h.grow(tc, 9)),
        ]
    )
    assert_close(ob, ref_b[14:], dtype)
    assert_close(oa[0], ref_a[13], dtype)
    assert_close(oc[0], ref_c[8], dtype)
    # steps 4..: A and C decode together, B decodes its own continuation
    for i in range(4):
        pa, pc = 14 + i, 9 + i
        oa, oc = h.step(
            [SeqChunk([a[pa]], pa, h.grow(ta, pa + 1)), SeqChunk([c[pc]], pc, h.grow(tc, pc + 1))]
        )
        assert_close(oa[0], ref_a[pa], dtype)
        assert_close(oc[0], ref_c[pc], dtype)


@params
def test_prefix_cache_hit(dtype, block_size):
    model = tiny_model(dtype)
    h = Harness(model, block_size)
    rng = random.Random(5)
    B = block_size
    shared = rand_ids(rng, 2 * B)
    a = shared + rand_ids(rng, B + 3)
    b = shared + rand_ids(rng, 5)
    ta = h.grow([], len(a))
    (out_a,) = h.step([SeqChunk(a, 0, ta)])
    assert_close(out_a[0], hf_logits(model, a)[-1], dtype)
    # B reuses A's two full blocks and computes only its own tail.
    tb = h.grow(ta[:2], len(b))
    (out_b,) = h.step([SeqChunk(b[2 * B :], 2 * B, tb, all_logits=True)])
    assert_close(out_b, hf_logits(model, b)[2 * B :], dtype)
    # A's blocks were only read: A still decodes correctly afterwards.
    a2 = [*a, 7]
    (out_a,) = h.step([SeqChunk([7], len(a), h.grow(ta, len(a2)))])
    assert_close(out_a[0], hf_logits(model, a2)[-1], dtype)


@params
def test_non_contiguous_block_ids(dtype, block_size):
    model = tiny_model(dtype)
    h = Harness(model, block_size, num_blocks=64)
    rng = random.Random(6)
    ids = rand_ids(rng, 3 * block_size + 2)
    n_blocks = 4
    table = [63, 0, 41, 7][:n_blocks]  # descending / scattered / includes block 0
    (got,) = h.step([SeqChunk(ids[:-1], 0, table, all_logits=True)])
    (last,) = h.step([SeqChunk(ids[-1:], len(ids) - 1, table)])
    ref = hf_logits(model, ids)
    assert_close(torch.cat([got, last]), ref, dtype)


def test_copy_blocks():
    cfg = tiny_model(torch.float32).config
    kv = KVCache.allocate(cfg, num_blocks=6, block_size=4, dtype=torch.float32, device="cpu")
    for t in (*kv.keys, *kv.values):
        t.normal_()
    before = [t.clone() for t in (*kv.keys, *kv.values)]
    kv.copy_blocks([(1, 4), (3, 0)])
    for t, old in zip((*kv.keys, *kv.values), before, strict=True):
        blocks, old_blocks = t.view(6, 4, *t.shape[1:]), old.view(6, 4, *t.shape[1:])
        assert torch.equal(blocks[4], old_blocks[1])
        assert torch.equal(blocks[0], old_blocks[3])
        for untouched in (1, 2, 3, 5):
            assert torch.equal(blocks[untouched], old_blocks[untouched])
    kv.copy_blocks([])  # no-op
    assert kv.num_blocks == 6 and kv.num_layers == cfg.n_layer
    per_block = sum(t.view(6, -1)[0].numel() * t.element_size() for t in (*kv.keys, *kv.values))
    assert KVCache.block_bytes(cfg, 4, torch.float32) == per_block


@params
def test_fork_copy_on_write(dtype, block_size):
    """Two sequences share a prompt's blocks; the partial last block is copied on write."""
    model = tiny_model(dtype)
    h = Harness(model, block_size)
    rng = random.Random(7)
    prompt = rand_ids(rng, 2 * block_size + 3)
    parent = h.grow([], len(prompt))
    h.step([SeqChunk(prompt, 0, parent)])
    child = [*parent[:-1], h.free.pop()]
    h.kv.copy_blocks([(parent[-1], child[-1])])
    x, y = [*prompt, 11], [*prompt, 22]
    ox, oy = h.step(
        [
            SeqChunk([11], len(prompt), h.grow(parent, len(x))),
            SeqChunk([22], len(prompt), h.grow(child, len(y))),
        ]
    )
    assert_close(ox[0], hf_logits(model, x)[-1], dtype)
    assert_close(oy[0], hf_logits(model, y)[-1], dtype)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(("seed", "cap"), [(0, "auto"), (1, "auto"), (2, 24)])
def test_random_schedule(block_size, seed, cap):
    """Random prompts, chunk sizes and decodes interleaved; every logits row matches HF."""
    dtype = torch.float64
    model = tiny_model(dtype)
    h = Harness(model, block_size, num_blocks=200, seed=seed)
    h.cap = cap  # 24 keys: many small decode batches, sorted by length
    rng = random.Random(100 + seed)
    seqs = []
    for _ in range(6):
        toks = rand_ids(rng, rng.randint(1, 40) + rng.randint(0, 6))
        seqs.append({"ids": toks, "done": 0, "table": [], "ref": hf_logits(model, toks)})
    while any(s["done"] < len(s["ids"]) for s in seqs):
        batch, owners = [], []
        for s in seqs:
            left = len(s["ids"]) - s["done"]
            if left == 0 or rng.random() < 0.3:
                continue
            n = min(left, rng.choice([1, 1, 2, 3, 7, 16]))
            st = s["done"]
            batch.append(
                SeqChunk(s["ids"][st : st + n], st, h.grow(s["table"], st + n), all_logits=True)
            )
            owners.append(s)
        if not batch:
            continue
        idx = list(range(len(batch)))
        rng.shuffle(idx)  # sequence order in a step must not matter
        outs = h.step([batch[i] for i in idx])
        for i, out in zip(idx, outs, strict=True):
            s, c = owners[i], batch[i]
            assert_close(out, s["ref"][c.start_pos : c.start_pos + len(c.token_ids)], dtype)
            s["done"] += len(c.token_ids)


def test_step_input_fields():
    B = 4
    chunks = [
        SeqChunk([5, 6, 7], 0, [9]),
        SeqChunk([8], 6, [3, 2], sample=True),
        SeqChunk([1, 2], 4, [0, 5], sample=False),
        SeqChunk([4], 3, [7, 8]),
    ]
    st = build_step_input(chunks, B, "cpu")
    assert st.input_ids.tolist() == [5, 6, 7, 8, 1, 2, 4]
    assert st.positions.tolist() == [0, 1, 2, 6, 4, 5, 3]
    assert st.slot_mapping.tolist() == [36, 37, 38, 2 * 4 + 2, 5 * 4 + 0, 5 * 4 + 1, 7 * 4 + 3]
    assert st.logits_indices.tolist() == [2, 3, 6]
    assert st.logits_counts == [1, 1, 0, 1]
    (d,) = st.decode
    assert d.rows.tolist() == [3, 6] and d.row_slice is None
    assert d.num_seqs == 2 and d.num_blocks == 2
    assert d.blocks.tolist() == [3, 2, 7, 7]  # second table padded with its own last block
    assert d.mask[:, 0, 0].tolist() == [[True] * 7 + [False], [True] * 4 + [False] * 4]
    assert [(p.start, p.end, p.ctx_len) for p in st.prefills] == [(0, 3, 3), (4, 6, 6)]
    assert st.prefills[0].ctx_blocks is None and st.prefills[0].mask is None
    assert st.prefills[1].ctx_blocks.tolist() == [0, 5]
    assert st.prefills[1].mask.tolist() == [[True] * 5 + [False], [True] * 6]


def test_decode_batching():
    B = 4
    # 10 decodes of 2 blocks each, one of 8 blocks: a 6-block cap (24 tokens) makes batches
    chunks = [SeqChunk([1], 7, [i, 100 + i]) for i in range(10)]
    chunks.insert(3, SeqChunk([1], 31, list(range(50, 58))))
    st = build_step_input(chunks, B, "cpu", decode_batch_tokens=24)
    seen = sorted(r for d in st.decode for r in d.rows.tolist())
    assert seen == list(range(11))
    for d in st.decode:
        assert d.num_seqs * d.num_blocks <= 24 // B or d.num_seqs == 1
        assert d.blocks.numel() == d.num_seqs * d.num_blocks
        if d.row_slice is not None:
            assert list(range(11))[d.row_slice] == d.rows.tolist()
    # the long sequence is batched alone, not padding the short ones to 8 blocks
    assert sum(d.num_seqs * d.num_blocks for d in st.decode) == 10 * 2 + 8
    # unbounded: one batch, rows 0..10 as a slice
    (one,) = build_step_input(chunks, B, "cpu", decode_batch_tokens=0).decode
    assert one.row_slice == slice(0, 11) and one.num_blocks == 8


def test_group_decodes_sorts_mixed_lengths():
    from app.modeling.attention_metadata import _group_decodes

    assert _group_decodes([2, 2, 2], None) == [[0, 1, 2]]
    assert _group_decodes([2, 2, 2], 4) == [[0, 1], [2]]
    assert _group_decodes([9], 4) == [[0]]  # too long for the budget: batched alone
    # alternating short / long: in order every batch pads to 5 blocks; sorted they don't
    groups = _group_decodes([1, 5, 1, 5, 1, 5], 10)
    assert groups == [[0, 2, 4], [1, 3], [5]]


@pytest.mark.parametrize("cap", [0, 8, 24, 40])
def test_decode_batching_parity(cap):
    dtype = torch.float64
    model = tiny_model(dtype)
    h = Harness(model, 4)
    rng = random.Random(11)
    prompts = [rand_ids(rng, n) for n in (3, 30, 5, 6, 17, 2, 9)]
    tables = [h.grow([], len(p) + 1) for p in prompts]
    h.step([SeqChunk(p, 0, t, sample=False) for p, t in zip(prompts, tables, strict=True)])
    nxt = rand_ids(rng, len(prompts))
    step = build_step_input(
        [SeqChunk([x], len(p), t) for p, x, t in zip(prompts, nxt, tables, strict=True)],
        4,
        "cpu",
        decode_batch_tokens=cap,
    )
    out = h.pm(step, h.kv)
    for row, p, x in zip(out, prompts, nxt, strict=True):
        assert_close(row, hf_logits(model, [*p, x])[-1], dtype)


def test_validation_errors():
    model = tiny_model(torch.float32)
    h = Harness(model, 4)
    with pytest.raises(ValueError, match="block table"):
        build_step_input([SeqChunk([1, 2, 3, 4, 5], 0, [0])], 4)
    with pytest.raises(ValueError, match="no new tokens"):
        build_step_input([SeqChunk([], 0, [0])], 4)
    with pytest.raises(ValueError, match="n_positions"):
        build_step_input([SeqChunk([1], 128, list(range(33)))], 4, max_positions=128)
    with pytest.raises(ValueError, match="n_positions"):
        h.pm(build_step_input([SeqChunk([1], 128, list(range(33)))], 4), h.kv)
    with pytest.raises(ValueError, match="block_size"):
        h.pm(build_step_input([SeqChunk([1], 0, [0])], 16), h.kv)
    bad_kv = KVCache.allocate(model.config, 4, 4, torch.float64, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        h.pm(build_step_input([SeqChunk([1], 0, [0])], 4), bad_kv)


def test_no_sampling_rows_and_shared_weights():
    model = tiny_model(torch.float32)
    h = Harness(model, 4)
    (out,) = h.step([SeqChunk([1, 2, 3], 0, h.grow([], 3), sample=False)])
    assert out.shape == (0, VOCAB)
    hf_w = model.transformer.h[0].attn.c_attn.weight
    assert h.pm.h[0].attn.c_attn.weight.data_ptr() == hf_w.data_ptr()
    assert h.pm.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_gelu_new_matches_act2fn(dtype):
    from transformers.activations import ACT2FN

    from app.modeling.gpt2 import gelu_new

    x = (torch.randn(10000, dtype=torch.float64) * 8).to(dtype)
    x[:4] = torch.tensor([0.0, -60.0, 60.0, 1e-3])  # fp16: x^3 overflows, result stays right
    want = ACT2FN["gelu_new"](x)
    got = gelu_new(x)
    tol = {torch.float64: 1e-14, torch.float32: 1e-5, torch.float16: 2e-2}[dtype]
    assert torch.allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("flag", ["reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx"])
def test_unsupported_config_flags(flag):
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=1,
        **{flag: True},
    )
    with pytest.raises(NotImplementedError):
        PagedGPT2.from_hf(GPT2LMHeadModel(cfg))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_hf(dtype):
    """The model's dtype is kept end to end; results agree with HF run in the same dtype."""
    ref_model = tiny_model(torch.float32)
    model = GPT2LMHeadModel(ref_model.config).eval()
    model.load_state_dict(ref_model.state_dict())
    model = model.to(dtype)
    h = Harness(model, 4)
    ids = rand_ids(random.Random(8), 21)
    table = h.grow([], 21)
    h.step([SeqChunk(ids[:12], 0, table, sample=False)])
    (mid,) = h.step([SeqChunk(ids[12:20], 12, table, all_logits=True)])
    (last,) = h.step([SeqChunk(ids[20:], 20, table)])
    assert mid.dtype == last.dtype == dtype
    ref = hf_logits(model, ids).float()
    got = torch.cat([mid, last]).float()
    # same arithmetic as HF in half precision: differences from op order / rounding only
    assert (got - ref[12:]).abs().max().item() < 0.02 * ref.abs().max().item()


@pytest.mark.skipif(
    not ((MINI_DIR / "config.json").exists() and (MINI_DIR / "model.safetensors").exists()),
    reason="embedded model models/kogpt2-mini not built",
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kogpt2_mini_parity(dtype):
    model = GPT2LMHeadModel.from_pretrained(MINI_DIR, dtype=dtype).eval()
    cfg = model.config
    h = Harness(model, 16, num_blocks=4 * (cfg.n_positions // 16 + 1))
    rng = random.Random(10)
    lens = [n for n in (1, 7, 33, 64) if n < cfg.n_positions]
    prompts = [rand_ids(rng, n, cfg.vocab_size) for n in lens]
    refs = [hf_logits(model, p) for p in prompts]
    # fp32 logits of a trained model are larger than the tiny random ones: relative bound
    scale = max(1.0, max(r.abs().max().item() for r in refs))
    tol = TOL[dtype] * scale
    tables = [h.grow([], len(p)) for p in prompts]
    # first half of each prompt in one batch (all_logits), the rest one token at a time
    half = [max(1, len(p) // 2) for p in prompts]
    outs = h.step(
        [
            SeqChunk(p[:k], 0, t, all_logits=True)
            for p, k, t in zip(prompts, half, tables, strict=True)
        ]
    )
    for out, r, k in zip(outs, refs, half, strict=True):
        assert (out - r[:k]).abs().max().item() < tol
    for pos in range(max(lens)):
        live = [i for i, p in enumerate(prompts) if half[i] <= pos < len(p)]
        if not live:
            continue
        outs = h.step([SeqChunk([prompts[i][pos]], pos, tables[i]) for i in live])
        for i, out in zip(live, outs, strict=True):
            assert (out[0] - refs[i][pos]).abs().max().item() < tol
