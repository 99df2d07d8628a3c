"""The sampling-only warpers, batched with per-row settings, in HF's order.

_get_logits_processor adds them only when do_sample: Temperature (t != 1), TopH (set),
TopK (k != 0), TopP (p < 1), MinP (set), Typical (p < 1), Epsilon and Eta (0 < x < 1), each
with filter value -inf and min_tokens_to_keep 1. Every op here is row-wise (element-wise, or
a reduction / sort / scan along the vocab), so a row's values are bit-identical to HF's on a
[1, V] batch. A per-row setting is a float32 column: HF's `tensor * python_float` and
`tensor < python_float` cast the scalar to float32 first, so the column gives the same values.
Divisions are the exception: they stay one Python float per distinct value, because CUDA
computes `tensor / scalar` as a multiplication by the reciprocal.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from app.engine.sample.row import SamplingRow

_NEG_INF = float("-inf")


def _col(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _apply(
    scores: torch.Tensor, members: list[int], fn: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """scores[members] = fn(scores[members]); consecutive members work on a view (no gather)."""
    if members == list(range(members[0], members[0] + len(members))):
        view = scores[members[0] : members[0] + len(members)]
        view.copy_(fn(view))
    else:
        idx = torch.tensor(members, device=scores.device)
        scores[idx] = fn(scores[idx])


def _temperature(scores: torch.Tensor, rows: Sequence[SamplingRow], members: list[int]) -> None:
    by_temp: dict[float, list[int]] = defaultdict(list)
    for i in members:
        by_temp[rows[i].temperature].append(i)
    for temp, group in by_temp.items():
        _apply(scores, group, lambda s, t=temp: s / t)  # Python float divisor, exactly as HF


def _top_h(sub: torch.Tensor, top_h: torch.Tensor) -> torch.Tensor:
    """TopHLogitsWarper: keep the top tokens until their entropy passes top_h * H (top 100)."""
    top_logits, top_idx = torch.topk(sub, min(100, sub.shape[-1]), dim=-1, largest=True)
    dist = torch.distributions.Categorical(logits=top_logits)
    probs = dist.probs
    tau = (dist.entropy() * top_h[:, 0]).unsqueeze(-1)
    cumulative = torch.cumsum(-probs * torch.log(probs), dim=-1)
    selection = cumulative <= tau
    selection[:, 0] = True
    keep = torch.zeros_like(sub, dtype=torch.bool)
    keep.scatter_(dim=1, index=top_idx, src=selection)
    out = sub.clone()
    out[~keep] = _NEG_INF
    return out


def _top_k(sub: torch.Tensor, ks: list[int]) -> torch.Tensor:
    # Every token scoring below the k-th largest value goes (ties with it stay).
    top_vals = torch.topk(sub, max(ks), dim=-1).values
    kth = top_vals.gather(1, torch.tensor(ks, device=sub.device)[:, None] - 1)
    return sub.masked_fill(sub < kth, _NEG_INF)


def _top_p(sub: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    short = _top_p_short(sub, top_p)
    if short is not None:
        return short
    sorted_logits, sorted_indices = torch.sort(sub, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # HF compares with the Python float (1 - top_p), which torch casts to float32.
    remove = cumulative <= _col([1.0 - p for p in top_p], cumulative)
    remove[..., -1:] = False  # min_tokens_to_keep = 1
    remove = remove.scatter(1, sorted_indices, remove)
    return sub.masked_fill(remove, _NEG_INF)


# Lane-alignment period of the short row: a multiple of every SIMD width (8 / 16 floats).
_ALIGN = 64


def _top_p_short(sub: torch.Tensor, top_p: list[float]) -> torch.Tensor | None:
    """top-p over only the finite entries (after top-k: a few dozen of V), bit-identical.

    HF sorts the whole row ascending, so the -inf entries come first and add exact zeros to
    the softmax sum and the cumsum. A row of L = m + ((V - m) % 64) entries (-inf padding, then
    the m largest ascending) puts every finite value at the same position modulo the SIMD
    width as the full sorted row, so the vectorized softmax sums the same terms in the same
    lanes and order: the same bits (tests/unit/test_sampler.py compares with TopPLogitsWarper).
    Ties among finite values would expose the unstable sort's order: those take the full path.
    CPU only: CUDA's softmax reduces in an order that depends on the row's length.
    """
    if sub.device.type != "cpu":
        return None
    vocab = sub.shape[-1]
    m = int((sub != _NEG_INF).sum(dim=-1).max())
    if m == 0 or 4 * m > vocab:
        return None
    values, indices = torch.topk(sub, m, dim=-1)  # descending; NaN and +inf would come first
    if bool((torch.isnan(values[:, 0]) | (values[:, 0] == float("inf"))).any()):
        return None  # HF's full sort decides
    values, indices = values.flip(-1), indices.flip(-1)  # ascending, as HF's sort
    if bool(((values[:, 1:] == values[:, :-1]) & torch.isfinite(values[:, 1:])).any()):
        return None
    pad = (vocab - m) % _ALIGN
    padded = torch.full((sub.shape[0], pad + m), _NEG_INF, dtype=sub.dtype, device=sub.device)
    padded[:, pad:] = values
    cumulative = padded.softmax(dim=-1).cumsum(dim=-1)[:, pad:]
    remove = cumulative <= _col([1.0 - p for p in top_p], cumulative)
    remove[..., -1:] = False  # min_tokens_to_keep = 1
    mask = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, indices, remove)
    return sub.masked_fill(mask, _NEG_INF)


def _min_p(sub: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(sub, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return sub.masked_fill(remove, _NEG_INF)


def _typical(sub: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    normalized = torch.nn.functional.log_softmax(sub, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
    cumulative = sub.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cumulative < mass).sum(dim=1)
    last_ind.clamp_(max=sorted_scores.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
    remove[..., :1] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return sub.masked_fill(remove, _NEG_INF)


def _epsilon(sub: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    remove = sub.softmax(dim=-1) < epsilon
    remove = remove & (sub < torch.topk(sub, 1)[0][..., -1, None])
    return sub.masked_fill(remove, _NEG_INF)


def _eta(sub: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    probabilities = sub.softmax(dim=-1)
    entropy = torch.distributions.Categorical(logits=sub).entropy()
    eps = epsilon[:, 0]
    eta = torch.min(eps, torch.sqrt(eps) * torch.exp(-entropy))[..., None]
    remove = (probabilities < eta) & (sub < torch.topk(sub, 1)[0][..., -1, None])
    return sub.masked_fill(remove, _NEG_INF)


def apply_warpers(
    scores: torch.Tensor, rows: Sequence[SamplingRow], sampling: list[int], touched: list[bool]
) -> None:
    """The warpers in HF's order, in place, each on the sampling rows that enable it."""
    vocab = scores.shape[-1]

    def stage(members: list[int], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if members:
            _apply(scores, members, fn)
            for i in members:
                touched[i] = True

    opts = {i: rows[i].options for i in sampling}
    temp = [i for i in sampling if rows[i].temperature != 1.0]
    if temp:
        _temperature(scores, rows, temp)
        for i in temp:
            touched[i] = True
    top_h = [i for i in sampling if opts[i] is not None and opts[i].top_h is not None]
    stage(top_h, lambda s: _top_h(s, _col([opts[i].top_h for i in top_h], s)))
    top_k = [i for i in sampling if rows[i].top_k != 0]
    ks = [min(max(rows[i].top_k, 1), vocab) for i in top_k]
    stage(top_k, lambda s: _top_k(s, ks))
    top_p = [i for i in sampling if rows[i].top_p < 1.0]
    stage(top_p, lambda s: _top_p(s, [rows[i].top_p for i in top_p]))
    if not any(o is not None for o in opts.values()):
        return  # the rest needs an option outside the core set
    min_p = [i for i in sampling if opts[i] is not None and opts[i].min_p is not None]
    stage(min_p, lambda s: _min_p(s, _col([opts[i].min_p for i in min_p], s)))
    typical = [i for i in sampling if opts[i] is not None and opts[i].typical_p < 1.0]
    stage(typical, lambda s: _typical(s, _col([opts[i].typical_p for i in typical], s)))
    eps = [i for i in sampling if opts[i] is not None and 0.0 < opts[i].epsilon_cutoff < 1.0]
    stage(eps, lambda s: _epsilon(s, _col([opts[i].epsilon_cutoff for i in eps], s)))
    eta = [i for i in sampling if opts[i] is not None and 0.0 < opts[i].eta_cutoff < 1.0]
    stage(eta, lambda s: _eta(s, _col([opts[i].eta_cutoff for i in eta], s)))
