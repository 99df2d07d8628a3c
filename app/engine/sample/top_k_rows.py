"""Sampling rows after top-k, kept as their few finite entries: same bits as HF's full rows.

With top-k on (HF's default 50), a sampling row leaves the warpers with k finite scores and
V - k entries of -inf, and every later step (top-p's sort, the softmax, multinomial's
`argmax(p / q)`, the log-probs) only reads the finite ones. This path finds them with one
`topk` over the processed scores and runs temperature, top-k, top-p, the softmax and the draw
on an [n, ~k] block instead of [n, V]. Exactness, step by step:
- temperature (x / t, a float32 division) is monotone, so top-k after it keeps HF's ranks;
  the (k+1)-th value must be strictly below the k-th after the division, else ties at the
  cut (raw or made by rounding) decide: that row takes the full path.
- top-p sorts the survivors as HF sorts the whole row (ascending, -inf first); finite ties
  would expose the unstable sort's order: full path. See logits_warpers._top_p_short.
- softmax / log_softmax sum exp over the row per SIMD lane, in index order. `lane_compact`
  drops the 64-wide blocks that hold only -inf (exact zeros in the sums) and keeps every
  other entry's position modulo 64 and order, the final partial block included, so each
  lane adds the same non-zero terms in the same order: the same bits as the full row.
- the draw: multinomial computes argmax(p / q) over the full row, p = 0 off the kept
  entries; the kept entries in ascending id order give the same first maximum unless the
  noise row holds an exact 0 (0 / 0 = NaN would win there): such rows draw on the full row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from app.engine.sample.row import SamplingRow

_NEG_INF = float("-inf")
# A multiple of every SIMD width and unrolling of torch's CPU reductions (8 / 16 floats).
LANE_PERIOD = 64


def takes_top_k_path(row: SamplingRow, vocab: int, device: torch.device) -> bool:
    """Whether a row's warpers are temperature / top-k / top-p only, with a small top-k, on
    CPU (the lane layout is that of torch's CPU kernels; CUDA reduces in another order)."""
    if device.type != "cpu" or not row.do_sample or row.top_k <= 0:
        return False
    if 4 * (row.top_k + 1) > vocab:
        return False
    opts = row.options
    return opts is None or (  # processors before the warpers are fine; later stages are not
        opts.top_h is None
        and opts.min_p is None
        and opts.typical_p >= 1.0
        and not 0.0 < opts.epsilon_cutoff < 1.0
        and not 0.0 < opts.eta_cutoff < 1.0
        and opts.watermarking_config is None
        and not opts.renormalize_logits
    )


@dataclass
class TopKRows:
    """The processed scores of n sampling rows, as their kept (finite) entries.

    Per row, `ids` ascend; a row with fewer kept entries than the width repeats its best
    entry (same id, same value), so scatters and gathers stay well defined."""

    ids: torch.Tensor  # [n, K] token ids
    values: torch.Tensor  # [n, K] processed scores at `ids`
    positions: torch.Tensor  # [n, K] column of each entry in `compact`
    compact: torch.Tensor  # [n, L] the rows with their -inf-only blocks dropped
    vocab: int

    def full(self, rows: list[int]) -> torch.Tensor:
        """These rows' processed scores over the whole vocabulary (what HF holds)."""
        idx = torch.tensor(rows, device=self.ids.device)
        out = torch.full(
            (len(rows), self.vocab), _NEG_INF, dtype=self.values.dtype, device=self.ids.device
        )
        return out.scatter_(1, self.ids[idx], self.values[idx])


def lane_compact(ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, int]:
    """Columns for ascending `ids` [n, K] in rows of a width L ≡ vocab (mod 64), such that
    each id keeps its position modulo 64 and its order within that lane, and the final
    partial block of the vocabulary stays the final partial block. Returns (columns, L)."""
    blocks = ids // LANE_PERIOD
    new_block = torch.ones_like(blocks, dtype=torch.bool)
    new_block[:, 1:] = blocks[:, 1:] != blocks[:, :-1]
    rank = new_block.long().cumsum(1) - 1  # the entry's block among its row's blocks
    in_tail = (blocks[:, -1] == vocab // LANE_PERIOD).long()  # only when vocab % 64 != 0
    whole = rank[:, -1] + 1 - in_tail  # the row's full blocks holding an entry
    n_blocks = max(1, int(whole.max()))  # >= 1: the kernels' short-row branch never runs
    slot = rank + (n_blocks - whole)[:, None]  # right-aligned; the tail block goes last
    return slot * LANE_PERIOD + ids % LANE_PERIOD, n_blocks * LANE_PERIOD + vocab % LANE_PERIOD


def _divide_by_temperature(values: torch.Tensor, temps: list[float]) -> torch.Tensor:
    by_temp: dict[float, list[int]] = defaultdict(list)
    for j, t in enumerate(temps):
        if t != 1.0:  # HF adds TemperatureLogitsWarper only then
            by_temp[t].append(j)
    if len(by_temp) == 1 and len(next(iter(by_temp.values()))) == len(temps):
        return values / next(iter(by_temp))  # the Python float divisor, exactly as HF
    out = values.clone()
    for t, group in by_temp.items():
        idx = torch.tensor(group, device=values.device)
        out[idx] = values[idx] / t
    return out


def _top_p(desc: torch.Tensor, top_p: list[float], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TopPLogitsWarper on rows given as their values sorted descending (-inf last); returns
    the values with the removed ones at -inf, and which rows had finite ties (full path)."""
    asc = desc.flip(-1)  # HF's ascending sort: -inf first, then the finite values
    ties = ((asc[:, 1:] == asc[:, :-1]) & torch.isfinite(asc[:, 1:])).any(dim=-1)
    pad = (vocab - asc.shape[-1]) % LANE_PERIOD  # the full sorted row's lanes (see module doc)
    padded = torch.cat([asc.new_full((asc.shape[0], pad), _NEG_INF), asc], dim=-1)
    cumulative = padded.softmax(dim=-1).cumsum(dim=-1)[:, pad:]
    # HF compares with the Python float (1 - top_p), which torch casts to float32.
    limit = torch.tensor([1.0 - p for p in top_p], dtype=asc.dtype, device=asc.device)
    remove = cumulative <= limit[:, None]
    remove[..., -1:] = False  # min_tokens_to_keep = 1
    return desc.masked_fill(remove.flip(-1), _NEG_INF), ties


def warp_top_k_rows(
    scores: torch.Tensor, rows: Sequence[SamplingRow]
) -> tuple[TopKRows | None, list[int], list[int]]:
    """Temperature, top-k and top-p of `rows` (takes_top_k_path) on their processed scores
    [n, V], which are left as they are. Returns the kept entries of the rows that took this
    path, those rows' indices, and the indices of the rows that need the full path."""
    n, vocab = scores.shape
    ks = [row.top_k for row in rows]
    values, ids = torch.topk(scores, max(ks) + 1, dim=-1)  # descending; NaN / +inf first
    values = _divide_by_temperature(values, [row.temperature for row in rows])
    dev = scores.device
    k_col = torch.tensor(ks, device=dev)[:, None]
    kth = values.gather(1, k_col - 1)
    after = values.gather(1, k_col)  # the best value top-k removes
    top = values[:, :1]
    ok = (((after < kth) | (kth == _NEG_INF)) & torch.isfinite(top))[:, 0]
    rank = torch.arange(values.shape[1], device=dev)[None, :]
    values = values.masked_fill(rank >= k_col, _NEG_INF)  # top-k
    nucleus = [j for j, row in enumerate(rows) if row.top_p < 1.0]
    if len(nucleus) == n:
        values, ties = _top_p(values, [row.top_p for row in rows], vocab)
        ok &= ~ties
    elif nucleus:
        idx = torch.tensor(nucleus, device=dev)
        kept, ties = _top_p(values[idx], [rows[j].top_p for j in nucleus], vocab)
        values[idx] = kept
        ok[idx] &= ~ties
    good = ok.tolist()
    fast = [j for j in range(n) if good[j]]
    slow = [j for j in range(n) if not good[j]]
    if not fast:
        return None, fast, slow
    if slow:
        idx = torch.tensor(fast, device=dev)
        values, ids = values[idx], ids[idx]
    kept = values != _NEG_INF
    width = int(kept.sum(dim=-1).max())  # columns past it are -inf in every row
    values, ids, kept = values[:, :width], ids[:, :width], kept[:, :width]
    ids = torch.where(kept, ids, ids[:, :1])  # pad with the row's best entry
    values = torch.where(kept, values, values[:, :1])
    ids, order = ids.sort(dim=-1)
    values = values.gather(1, order)
    positions, width = lane_compact(ids, vocab)
    compact = values.new_full((len(fast), width), _NEG_INF).scatter_(1, positions, values)
    return TopKRows(ids, values, positions, compact, vocab), fast, slow


def draw_top_k_rows(
    rows: TopKRows, noise: torch.Tensor, noise_rows: list[int], zero_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """multinomial(softmax(scores), 1) per row given its noise row (`noise[noise_rows[j]]`),
    and the token's log-prob under the processed scores (HF's output_scores)."""
    dev = rows.ids.device
    index = torch.tensor(noise_rows, device=dev)
    probs = torch.softmax(rows.compact, dim=-1).gather(1, rows.positions)
    ratio = probs / noise.view(-1)[index[:, None] * rows.vocab + rows.ids]
    best = ratio.argmax(dim=-1, keepdim=True)  # first maximum: the lowest id, as on the full row
    tokens = rows.ids.gather(1, best)[:, 0]
    logprobs = torch.log_softmax(rows.compact, dim=-1).gather(1, rows.positions.gather(1, best))
    logprobs = logprobs[:, 0]
    # A 0 in the noise off the kept entries makes a NaN there, which argmax would pick.
    redo = (zero_rows[index] | ~(ratio.gather(1, best)[:, 0] > 0)).nonzero()[:, 0].tolist()
    for j in redo:
        full = torch.zeros(rows.vocab, dtype=probs.dtype, device=dev)
        full.scatter_(0, rows.ids[j], probs[j])
        tokens[j] = torch.argmax(full / noise[noise_rows[j]])
        logprobs[j] = torch.log_softmax(rows.full([j])[0], dim=-1)[tokens[j]]
    return tokens, logprobs
