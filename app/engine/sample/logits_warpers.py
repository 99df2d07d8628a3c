"""The sampling-only warpers, batched with per-row settings, in HF's order.

_get_logits_processor adds them only when do_sample: Temperature (t != 1), TopH (set),
TopK (k != 0), TopP (p < 1), MinP (set), Typical (p < 1), Epsilon and Eta (0 < x < 1), each
with filter value -inf and min_tokens_to_keep 1. Every op here is row-wise (element-wise, or
a reduction / sort / scan along the vocab), so a row's values are bit-identical to HF's on a
[1, V] batch. A per-row setting is a float32 column: HF's `tensor * python_float` and
`tensor < python_float` cast the scalar to float32 first, so the column gives the same values.
Divisions are the exception: they stay one Python float per distinct value, because CUDA
computes `tensor / scalar` as a multiplication by the reciprocal.

`plan_warpers` decides on the host which rows each warper touches and stages their row
selections and per-row columns (`DeviceInputs`), so that they reach the device with the rest of
the sampler call's inputs in one copy; `run_warpers` then launches the stages.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from app.engine.sample.device_inputs import DeviceInputs, RowSelection

if TYPE_CHECKING:
    from app.engine.sample.row import SamplingRow

_NEG_INF = float("-inf")


def _col(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


@dataclass
class WarpStage:
    """One warper over the rows that enable it: scores[rows] = fn(scores[rows])."""

    members: list[int]
    rows: RowSelection
    fn: Callable[[torch.Tensor], torch.Tensor]


def _apply(
    scores: torch.Tensor, rows: RowSelection, fn: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """scores[rows] = fn(scores[rows]); consecutive rows work on a view (no gather)."""
    if rows.index is None:
        view = rows.take(scores)
        view.copy_(fn(view))
    else:
        rows.put(scores, fn(rows.take(scores)))


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
    # HF's `out[~keep] = -inf`, without the boolean index's device sync (a nonzero on CUDA).
    return sub.masked_fill(~keep, _NEG_INF)


def _top_k(sub: torch.Tensor, k_max: int, kth_column: torch.Tensor | None) -> torch.Tensor:
    """``kth_column``: [n, 1] each row's k - 1 (the column of its k-th largest value); None
    when every row's k is ``k_max``."""
    # Every token scoring below the k-th largest value goes (ties with it stay).
    top_vals = torch.topk(sub, k_max, dim=-1).values
    kth = top_vals[:, -1:] if kth_column is None else top_vals.gather(1, kth_column)
    return sub.masked_fill(sub < kth, _NEG_INF)


def _top_p(
    sub: torch.Tensor, top_p: list[float], limit: torch.Tensor | float | None = None
) -> torch.Tensor:
    """``limit``: [n, 1] float32 column of 1 - top_p, or the Python float 1 - top_p when all
    rows share it (torch casts it to float32, as HF's own comparison); made from ``top_p``
    when None."""
    if limit is None:
        limit = _col([1.0 - p for p in top_p], sub)
    short = _top_p_short(sub, top_p, limit)
    if short is not None:
        return short
    sorted_logits, sorted_indices = torch.sort(sub, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # HF compares with the Python float (1 - top_p), which torch casts to float32.
    remove = cumulative <= limit
    remove[..., -1:] = False  # min_tokens_to_keep = 1
    remove = remove.scatter(1, sorted_indices, remove)
    return sub.masked_fill(remove, _NEG_INF)


# Lane-alignment period of the short row: a multiple of every SIMD width (8 / 16 floats).
_ALIGN = 64


def _top_p_short(
    sub: torch.Tensor, top_p: list[float], limit: torch.Tensor | float | None = None
) -> torch.Tensor | None:
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
    if limit is None:
        limit = _col([1.0 - p for p in top_p], cumulative)
    remove = cumulative <= limit
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


def plan_warpers(
    rows: Sequence[SamplingRow], sampling: list[int], vocab: int, inputs: DeviceInputs
) -> list[WarpStage]:
    """The warpers in HF's order, each on the sampling rows that enable it, with their row
    selections and per-row settings staged in ``inputs`` (host work only)."""
    stages: list[WarpStage] = []

    def stage(members: list[int], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if members:
            stages.append(WarpStage(members, inputs.rows(members), fn))

    def column(values: list[float]) -> Callable[[], torch.Tensor]:
        staged = inputs.floats(values)
        return lambda: staged.column

    opts = {i: rows[i].options for i in sampling}
    by_temp: dict[float, list[int]] = defaultdict(list)
    for i in sampling:
        if rows[i].temperature != 1.0:
            by_temp[rows[i].temperature].append(i)
    for temp, group in by_temp.items():
        stage(group, lambda s, t=temp: s / t)  # Python float divisor, exactly as HF
    top_h = [i for i in sampling if opts[i] is not None and opts[i].top_h is not None]
    if top_h:
        h = column([opts[i].top_h for i in top_h])
        stage(top_h, lambda s: _top_h(s, h()))
    # top-k and top-p: one setting shared by every row (the usual batch) needs no column.
    top_k = [i for i in sampling if rows[i].top_k != 0]
    if top_k:
        ks = [min(max(rows[i].top_k, 1), vocab) for i in top_k]
        if len(set(ks)) == 1:
            stage(top_k, lambda s: _top_k(s, ks[0], None))
        else:
            kth = inputs.ints([k - 1 for k in ks])
            stage(top_k, lambda s: _top_k(s, max(ks), kth.column))
    top_p = [i for i in sampling if rows[i].top_p < 1.0]
    if top_p:
        ps = [rows[i].top_p for i in top_p]
        if len(set(ps)) == 1:
            stage(top_p, lambda s: _top_p(s, ps, 1.0 - ps[0]))
        else:
            limit = column([1.0 - p for p in ps])
            stage(top_p, lambda s: _top_p(s, ps, limit()))
    if not any(o is not None for o in opts.values()):
        return stages  # the rest needs an option outside the core set
    min_p = [i for i in sampling if opts[i] is not None and opts[i].min_p is not None]
    if min_p:
        m = column([opts[i].min_p for i in min_p])
        stage(min_p, lambda s: _min_p(s, m()))
    typical = [i for i in sampling if opts[i] is not None and opts[i].typical_p < 1.0]
    if typical:
        mass = column([opts[i].typical_p for i in typical])
        stage(typical, lambda s: _typical(s, mass()))
    eps = [i for i in sampling if opts[i] is not None and 0.0 < opts[i].epsilon_cutoff < 1.0]
    if eps:
        e = column([opts[i].epsilon_cutoff for i in eps])
        stage(eps, lambda s: _epsilon(s, e()))
    eta = [i for i in sampling if opts[i] is not None and 0.0 < opts[i].eta_cutoff < 1.0]
    if eta:
        cut = column([opts[i].eta_cutoff for i in eta])
        stage(eta, lambda s: _eta(s, cut()))
    return stages


def run_warpers(scores: torch.Tensor, stages: list[WarpStage], touched: list[bool]) -> None:
    """The planned warpers, in place, in order (after ``DeviceInputs.upload``)."""
    for st in stages:
        _apply(scores, st.rows, st.fn)
        for i in st.members:
            touched[i] = True


def apply_warpers(
    scores: torch.Tensor, rows: Sequence[SamplingRow], sampling: list[int], touched: list[bool]
) -> None:
    """The warpers in HF's order, in place, each on the sampling rows that enable it."""
    inputs = DeviceInputs(scores.device)
    stages = plan_warpers(rows, sampling, scores.shape[-1], inputs)
    inputs.upload()
    run_warpers(scores, stages, touched)
