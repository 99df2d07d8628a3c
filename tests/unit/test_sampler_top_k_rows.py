"""The top-k rows path (app/engine/sample/top_k_rows.py) gives the bits of HF's full-row warpers.

Reference: transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper on the
row alone ([1, V], as generate runs it), then softmax and torch.multinomial with the row's
generator; log-probs are log_softmax of the processed row. Ties at the top-k cut, finite ties
under top-p, a 0 in the noise and invalid rows all have their own cases.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from app.engine.sample.row import SamplingRow, make_generator
from app.engine.sample.sampler import Sampler
from app.engine.sample.seeded_draw import NoiseFills
from app.engine.sample.top_k_rows import draw_top_k_rows, lane_compact, warp_top_k_rows

NEG_INF = float("-inf")


def hf_warp(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What generate's warpers make of one row's float32 scores (do_sample=True)."""
    scores = row[None].clone()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k != 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores[0]


def row(temperature: float, top_k: int, top_p: float, seed: int | None = None) -> SamplingRow:
    gen = None if seed is None else make_generator(seed)
    return SamplingRow([3, 4], True, temperature, top_k, top_p, generator=gen)


def logits_batch(n: int, vocab: int, seed: int, peaked: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=gen) * 2
    if peaked:  # a few dozen clear candidates, as a language model gives
        hot = torch.randint(0, vocab, (n, 48), generator=gen)
        x.scatter_add_(1, hot, torch.rand(n, 48, generator=gen) * 8)
    return x


@pytest.mark.parametrize("vocab", [51200, 50257, 3262, 777, 300])
def test_lane_compact_softmax_equals_the_full_row(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    for k in (1, 3, 40, vocab // 8):
        x = torch.randn(6, vocab, generator=gen) * 4
        values, ids = torch.topk(x, k, dim=-1)
        if vocab % 64:  # one row kept only in the final partial block, one partly in it
            tail = torch.arange(vocab - vocab % 64, vocab)
            ids[0] = tail[torch.arange(k) % len(tail)]
            ids[1, : k // 2] = tail[: min(k // 2, len(tail))].repeat(k)[: k // 2]
            values[:2] = x[:2].gather(1, ids[:2])
        ids, order = ids.sort(dim=-1)
        values = values.gather(1, order)
        full = torch.full((6, vocab), NEG_INF).scatter_(1, ids, values)
        positions, width = lane_compact(ids, vocab)
        assert width % 64 == vocab % 64 and width <= vocab + 64
        compact = torch.full((6, width), NEG_INF).scatter_(1, positions, values)
        for fn in (torch.softmax, torch.log_softmax):
            assert torch.equal(fn(full, -1).gather(1, ids), fn(compact, -1).gather(1, positions))


def test_packing_the_entries_side_by_side_would_not_be_exact() -> None:
    """The lane layout matters: the same values packed densely sum in another order."""
    x = logits_batch(16, 51200, 1, peaked=False)
    values, ids = torch.topk(x, 100, dim=-1)
    ids, order = ids.sort(dim=-1)
    values = values.gather(1, order)
    full = torch.full_like(x, NEG_INF).scatter_(1, ids, values)
    assert not torch.equal(torch.softmax(full, -1).gather(1, ids), torch.softmax(values, -1))


@pytest.mark.parametrize("vocab", [51200, 3262, 777])
def test_warp_and_draw_equal_hf_and_multinomial(vocab: int) -> None:
    settings = [(0.8, 40, 0.9), (1.0, 50, 1.0), (1.3, 7, 0.5), (0.7, 1, 0.92), (0.5, 20, 0.999)]
    logits = logits_batch(len(settings) * 2, vocab, vocab)
    rows = [row(*settings[j % len(settings)], seed=j) for j in range(logits.shape[0])]
    rows[3] = row(*settings[3])  # an unseeded row: the shared generator
    shared_seed = 77
    top_k, fast, slow = warp_top_k_rows(logits, rows)
    assert top_k is not None and fast == list(range(len(rows))) and slow == []
    fills = NoiseFills(
        [r.generator for r in rows], make_generator(shared_seed), vocab, logits.device
    )
    noise_rows = [fills.row[j] for j in fast]
    tokens, logprobs = draw_top_k_rows(top_k, fills.tensor(), noise_rows, fills.zero_rows())
    full = top_k.full(fast)
    for j, r in enumerate(rows):
        want = hf_warp(logits[j], r.temperature, r.top_k, r.top_p)
        assert torch.equal(full[j], want), (j, r.temperature, r.top_k, r.top_p)
        gen = make_generator(shared_seed if j == 3 else j)
        expected = int(torch.multinomial(torch.softmax(want[None], -1), 1, generator=gen))
        assert int(tokens[j]) == expected
        assert float(logprobs[j]) == float(torch.log_softmax(want, -1)[expected])
        if j != 3:
            assert torch.equal(r.generator.get_state(), gen.get_state())


def test_ties_at_the_top_k_cut_and_under_top_p_take_the_full_path() -> None:
    x = logits_batch(4, 3262, 5)
    top = torch.topk(x, 12, dim=-1).indices
    x[0, top[0, 9]] = x[0, top[0, 10]]  # ranks 10 and 11 tie: k = 10 cuts between them
    x[1, top[1, 3]] = x[1, top[1, 4]]  # a finite tie inside the top-k, top-p on
    x[2, top[2, 3]] = x[2, top[2, 4]]  # the same tie, top-p off: no sort, so no problem
    x[3, top[3, 0]] = float("nan")  # NaN: HF's own path decides (and fails)
    rows = [row(1.0, 10, 1.0), row(1.0, 10, 0.9), row(1.0, 10, 1.0), row(1.0, 10, 0.9)]
    top_k, fast, slow = warp_top_k_rows(x, rows)
    assert fast == [2] and slow == [0, 1, 3]
    assert top_k is not None and torch.equal(top_k.full([0])[0], hf_warp(x[2], 1.0, 10, 1.0))


def test_temperature_rounding_that_makes_a_tie_at_the_cut_takes_the_full_path() -> None:
    x = torch.full((1, 1000), -5.0)
    fourth = torch.tensor(1e-5)
    fifth = torch.nextafter(fourth, torch.tensor(0.0))  # distinct before the division
    x[0, :5] = torch.tensor([3.0, 2.5, 2.0, float(fourth), float(fifth)])
    t = 1e35  # x / t lands in the subnormals: ranks 4 and 5 round to the same float32
    assert float(x[0, 3] / t) == float(x[0, 4] / t)
    _, fast, slow = warp_top_k_rows(x, [row(t, 4, 1.0)])
    assert fast == [] and slow == [0]


def test_a_zero_in_the_noise_draws_as_multinomial_does() -> None:
    """q = 0 off the kept entries makes 0 / 0 = NaN there, and argmax picks the NaN."""
    x = logits_batch(2, 777, 9)
    rows = [row(1.0, 5, 1.0, seed=1), row(1.0, 5, 1.0, seed=2)]
    top_k, fast, _ = warp_top_k_rows(x, rows)
    assert top_k is not None
    noise = torch.empty(2, 777).exponential_(1.0, generator=torch.Generator().manual_seed(3))
    off = int(torch.ones(777, dtype=torch.bool).scatter_(0, top_k.ids[0], False).nonzero()[0, 0])
    noise[0, off] = 0.0
    tokens, logprobs = draw_top_k_rows(top_k, noise, [0, 1], (noise == 0).any(-1))
    probs = torch.softmax(top_k.full(fast), -1)
    assert tokens.tolist() == torch.argmax(probs / noise, -1).tolist()
    assert int(tokens[0]) == off and logprobs[0] == NEG_INF


def reference(
    logits: torch.Tensor, rows: list[SamplingRow], shared_seed: int
) -> tuple[list[int], list[float], list[list[int]]]:
    """Per row what generate does; unseeded rows share one generator in row order."""
    shared = make_generator(shared_seed)
    tokens, logprobs, tops = [], [], []
    for j, r in enumerate(rows):
        scores = logits[j].float()
        if r.do_sample:
            scores = hf_warp(scores, r.temperature, r.top_k, r.top_p)
            gen = r.generator if r.generator is not None else shared
            tok = int(torch.multinomial(torch.softmax(scores[None], -1), 1, generator=gen))
        else:
            tok = int(torch.argmax(scores))
        lp = torch.log_softmax(scores, -1)
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        vals, ids = torch.topk(lp, r.top_n) if r.top_n else (torch.empty(0), torch.empty(0))
        tops.append([int(i) for i, v in zip(ids, vals, strict=True) if v != NEG_INF])
    return tokens, logprobs, tops


def test_sampler_mixes_greedy_full_and_top_k_rows_like_generate() -> None:
    vocab = 3262
    specs = [  # (do_sample, temperature, top_k, top_p, seed, top_n)
        (False, 1.0, 50, 1.0, None, 0),
        (True, 0.8, 40, 0.9, 1, 3),  # top-k rows
        (True, 0.7, 0, 1.0, 2, 0),  # top_k = 0: the full-row path
        (True, 1.0, 50, 0.92, None, 2),  # unseeded top-k row: the shared generator
        (False, 1.0, 50, 1.0, None, 5),
        (True, 1.0, 0, 0.8, None, 0),  # unseeded full row: shared generator, in row order
        (True, 1.2, 5, 1.0, 3, 0),
        (True, 1.0, 3000, 1.0, 4, 0),  # k too large for the top-k path
    ]
    logits = logits_batch(len(specs), vocab, 11)

    def make_rows() -> list[SamplingRow]:
        out = []
        for do_sample, t, k, p, seed, top_n in specs:
            r = row(t, k, p, seed)
            r.do_sample, r.top_n = do_sample, top_n
            out.append(r)
        return out

    for step in range(3):  # the generators advance exactly as generate's
        ours, theirs = make_rows(), make_rows()
        for _ in range(step):
            Sampler(make_generator(99)).sample(logits, ours)
            reference(logits, theirs, 99)
        out = Sampler(make_generator(99)).sample(logits, ours)
        tokens, logprobs, tops = reference(logits, theirs, 99)
        assert out.token_ids == tokens
        assert out.processed_logprobs == logprobs
        assert out.top_token_ids == tops
        raw = torch.log_softmax(logits, -1)
        assert out.logprobs == [float(raw[j, t]) for j, t in enumerate(tokens)]


def test_siblings_sharing_a_generator_draw_as_one_batched_multinomial() -> None:
    logits = logits_batch(4, 777, 13)
    gen, other = make_generator(5), make_generator(6)
    rows = [row(0.9, 30, 0.95), row(0.9, 30, 0.95), row(1.0, 0, 1.0), row(0.9, 30, 0.95)]
    rows[0].generator = rows[1].generator = rows[3].generator = gen
    rows[2].generator = other
    out = Sampler().sample(logits, rows)
    warped = torch.stack([hf_warp(logits[j], 0.9, 30, 0.95) for j in (0, 1, 3)])
    batched = torch.multinomial(torch.softmax(warped, -1), 1, generator=make_generator(5))
    assert [out.token_ids[j] for j in (0, 1, 3)] == batched[:, 0].tolist()


def test_a_failing_call_leaves_every_generator_as_it_was() -> None:
    logits = logits_batch(3, 777, 17)
    logits[2] = float("nan")  # multinomial refuses this row: the whole call raises
    rows = [row(0.8, 40, 0.9, seed=1), row(1.0, 0, 1.0, seed=2), row(1.0, 0, 1.0, seed=3)]
    shared = make_generator(4)
    before = [r.generator.get_state() for r in rows] + [shared.get_state()]
    with pytest.raises(RuntimeError, match="probability tensor"):
        Sampler(shared).sample(logits, rows)
    after = [r.generator.get_state() for r in rows] + [shared.get_state()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    good = Sampler(shared).sample(logits[:2], rows[:2])  # the retry draws what it would have
    fresh = [row(0.8, 40, 0.9, seed=1), row(1.0, 0, 1.0, seed=2)]
    assert good.token_ids == Sampler(make_generator(4)).sample(logits[:2], fresh).token_ids


@pytest.mark.parametrize("vocab", [51200, 3262])
def test_top_p_on_the_cut_of_the_cumulative_sum(vocab: int) -> None:
    """top_p placed exactly on one of HF's cumulative sums: one ulp off flips the cut."""
    x = logits_batch(8, vocab, 21, peaked=False) * 3
    checked = 0
    for j in range(8):
        kept = TopKLogitsWarper(40)(None, x[j : j + 1].clone())
        cumulative = torch.sort(kept, descending=False)[0].softmax(-1).cumsum(-1)[0, -40:]
        for c in cumulative[5:-1:4].tolist():
            p = 1.0 - c
            if float(torch.tensor(1.0 - p, dtype=torch.float32)) != c:
                continue  # the double round trip missed c itself
            top_k, fast, _ = warp_top_k_rows(x[j : j + 1], [row(1.0, 40, p)])
            assert fast == [0] and top_k is not None
            assert torch.equal(top_k.full([0])[0], hf_warp(x[j], 1.0, 40, p))
            checked += 1
    assert checked >= 40
