"""Batched logits processing and token choice, identical to transformers' `_sample` loop.

For one row, `model.generate` does (transformers 5.23, GenerationMixin._sample):
    scores = logits[:, -1].to(float32)
    scores = logits_processor(input_ids, scores)   # the list _get_logits_processor builds
    if do_sample: probs = softmax(scores); token = multinomial(probs, 1)
    else:         token = argmax(scores)
Here the same processors run on a [S, V] batch with per-row settings, in HF's order:
logits_processors.apply_processors (biases, penalties, bans, min length, forced tokens, ...),
logits_warpers.apply_warpers (sampling rows only: temperature, top-h, top-k, top-p, min-p,
typical, epsilon, eta), logits_processors.apply_post (watermark, renormalize). A row without
any option beyond temperature / top-k / top-p / min length (`SamplingRow.options is None`)
never enters the extra stages, so it costs what it did before they existed.

Seeds: `torch.manual_seed(s); model.generate(...)` draws from the default generator, and
multinomial on a [1, V] row consumes V exponential samples per step. A seeded row therefore
draws with its own generator (`make_generator`), so its draws do not depend on the rest of the
batch; unseeded rows share the sampler's generator, in row order, as one batched multinomial.
The noise does not depend on the logits: its fills start first and overlap the processing
(seeded_draw.NoiseFills); a call that raises leaves every generator as it found it.

Sampling rows whose warpers are temperature / top-k / top-p with a small k (HF's default
top_k = 50) run them on their few surviving entries (top_k_rows.py, same bits as the full
rows); the others go through logits_warpers on full rows. The sampler works on the rows
grouped as greedy / full / top-k: the float32 copy HF makes is the gather into that order.

Host-device traffic (CUDA): the call plans on the host first, stages every row selection and
per-row setting the plain rows' device work reads (the gather into plan order, the warpers'
rows and settings, the noise rows, the log-prob rows, the top-n rows) in `DeviceInputs`, and
sends them in one non-blocking copy (none when they equal the previous call's). Everything the
host needs back (tokens, their log-probs, multinomial's validity check per drawn row, the
top-n ids and log-probs) comes back in one copy of one packed float64 tensor (ids below 2^53
and float32 values are exact in it). `sample` reads it at once; `launch` (async scheduling)
leaves the tokens on the device for the next step's inputs and starts the copy non-blocking
into pinned memory, and `SampleLaunch.finish` waits for it later. Rows with logits options,
guidance or grammar still make their own transfers (docs/ARCHITECTURE.md, "Host-device
syncs of a decode step").

Log-probs: `processed_logprobs` is log_softmax of the processed scores (HF's output_scores),
the distribution the token was actually chosen from; top-n alternatives rank by it.
`logprobs` is log_softmax of the raw float32 logits (HF's output_logits), computed only when
read: the engine reports the processed ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from app.engine.sample.device_inputs import DeviceInputs, RowSelection, UploadCache
from app.engine.sample.logits_processors import Extra, HFRowFallback, apply_post, apply_processors
from app.engine.sample.logits_warpers import plan_warpers, run_warpers
from app.engine.sample.row import SamplingRow
from app.engine.sample.seeded_draw import (
    NoiseFills,
    gumbel_argmax,
    invalid_codes,
    multinomial_error,
)
from app.engine.sample.top_k_rows import (
    TopKRows,
    draw_top_k_rows,
    takes_top_k_path,
    warp_top_k_rows,
)

_Result = TypeVar("_Result")  # what a sampler call ends with (Sampler._run's `then`)


@dataclass
class SamplerOutput:
    """Per row: the chosen token, its log-probs, and the top-n alternatives when asked."""

    token_ids: list[int]
    # log_softmax of the PROCESSED scores at the chosen token (HF's output_scores): the
    # distribution the token was drawn from.
    processed_logprobs: list[float]
    # The row's `top_n` most likely tokens under the processed scores, best first, and their
    # processed log-probs; removed tokens (-inf) are left out. [] when top_n = 0.
    top_token_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    raw_logits: torch.Tensor | None = field(default=None, repr=False)
    # Rows multinomial's checks refuse -> seeded_draw's code; the first drawn first. `sample`
    # raises for them; a launched call's caller fails their requests.
    invalid: dict[int, int] = field(default_factory=dict)
    _raw: list[float] | None = field(default=None, init=False, repr=False)

    @property
    def logprobs(self) -> list[float]:
        """log_softmax of the RAW float32 logits at the chosen token (HF's output_logits),
        computed on first use (the engine reports the processed ones)."""
        if self.raw_logits is None:
            return []
        if self._raw is None:
            raw = torch.log_softmax(self.raw_logits.to(torch.float32), dim=-1)
            chosen = torch.tensor(self.token_ids, device=raw.device)[:, None]
            self._raw = raw.gather(1, chosen)[:, 0].tolist()
        return self._raw


@dataclass
class SampleLaunch:
    """A sampler call whose device work is queued: `tokens` (plan order; row i's is at
    `position[i]`) stay on the device, everything the host needs comes back in one packed
    float64 copy (`start_copy`: non-blocking into pinned memory on CUDA; else `finish` copies
    it). `finish` waits for it and unpacks the SamplerOutput."""

    tokens: torch.Tensor
    order: list[int]  # plan position -> row
    drawn: list[int]  # plan positions of the rows drawn by multinomial (validity codes)
    top: tuple[list[int], int] | None  # the plan positions asking top-n, and n
    top_n: list[int]  # per plan position, the row's own top_n
    packed: torch.Tensor
    raw_logits: torch.Tensor
    _host: torch.Tensor | None = field(default=None, repr=False)
    _copied: Any = field(default=None, repr=False)  # the CUDA event after the copy

    @property
    def position(self) -> list[int]:
        """Row -> its plan position (its token's index in `tokens`)."""
        return _unpermute(list(range(len(self.order))), self.order)

    def start_copy(self) -> None:
        """On CUDA, the copy back starts now, non-blocking into pinned memory: nothing waits
        until `finish` (the step worker goes on to queue the next step)."""
        if self.packed.device.type != "cuda" or self._host is not None:
            return
        self._host = torch.empty(self.packed.shape, dtype=self.packed.dtype).pin_memory()
        self._host.copy_(self.packed, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def finish(self) -> SamplerOutput:
        """The results on the host (waits for the device's work up to the copy)."""
        if self._host is not None:
            self._copied.synchronize()
            host = self._host.tolist()
        else:  # the call's one device-to-host copy (none on CPU)
            host = self.packed.to("cpu").tolist()
        order, size, drawn, top = self.order, len(self.order), self.drawn, self.top
        out = SamplerOutput(
            _unpermute([int(t) for t in host[:size]], order),
            _unpermute(host[size : 2 * size], order),
            raw_logits=self.raw_logits,
        )
        at = 2 * size
        if drawn:
            codes = host[at : at + len(drawn)]
            out.invalid = {order[p]: int(c) for p, c in zip(drawn, codes, strict=True) if c}
            at += len(drawn)
        out.top_token_ids = [[] for _ in order]
        out.top_logprobs = [[] for _ in order]
        if top is not None:
            members, n = top
            flat_values = host[at : at + len(members) * n]
            flat_ids = host[at + len(members) * n : at + 2 * len(members) * n]
            for j, p in enumerate(members):
                vals = flat_values[j * n : (j + 1) * n]
                keep = [k for k in range(min(self.top_n[p], n)) if math.isfinite(vals[k])]
                out.top_token_ids[order[p]] = [int(flat_ids[j * n + k]) for k in keep]
                out.top_logprobs[order[p]] = [vals[k] for k in keep]
        return out


@dataclass
class _Plan:
    """The rows grouped by how they are chosen; the sampler works on them in `order`."""

    greedy: list[int]
    full: list[int]  # sampling rows through the full-row warpers
    top_k: list[int]  # sampling rows through top_k_rows (small top-k, no later warper)

    @classmethod
    def of(cls, rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> _Plan:
        plan = cls([], [], [])
        for i, row in enumerate(rows):
            if not row.do_sample:
                plan.greedy.append(i)
            elif takes_top_k_path(row, vocab, device):
                plan.top_k.append(i)
            else:
                plan.full.append(i)
        return plan

    @property
    def order(self) -> list[int]:
        return self.greedy + self.full + self.top_k


class Sampler:
    """Chooses one token per row; rows differ in strategy, processors and generator."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Generator for unseeded sampling rows; None draws from torch's default generator.
        self.generator = generator
        self.fallback = HFRowFallback()
        # The last call's staged inputs on the device, reused by a call with the same ones.
        self.uploads = UploadCache()

    def _before_warpers(
        self, scores: torch.Tensor, rows: Sequence[SamplingRow], touched: list[bool]
    ) -> Extra:
        self._guidance(scores, rows, touched)
        extra: Extra = [(i, r, r.options) for i, r in enumerate(rows) if r.options is not None]
        apply_processors(scores, rows, extra, touched)
        return extra

    @staticmethod
    def _guidance(scores: torch.Tensor, rows: Sequence[SamplingRow], touched: list[bool]) -> None:
        """UnbatchedClassifierFreeGuidanceLogitsProcessor, first in HF's list: log-softmax of
        the scores, pushed away from the unconditional (negative prompt) distribution."""
        for i, row in enumerate(rows):
            if row.uncond_logits is None:
                continue
            cond = torch.log_softmax(scores[i], dim=-1)
            uncond = torch.log_softmax(row.uncond_logits, dim=-1)  # the model's dtype, as HF
            mixed = row.guidance_scale * (cond - uncond) + uncond
            scores[i] = mixed.to(scores.dtype)
            touched[i] = True

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """One token per row; a row whose probabilities multinomial would refuse raises its
        error (the first such row's) with every generator as it was before the call."""
        return self._run(logits, rows, _read_now)

    def launch(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleLaunch:
        """The call's device work, queued: the tokens stay on the device (the next step's
        input ids take them there, app/engine/async_scheduling.py) while the results come
        back in one non-blocking copy that `SampleLaunch.finish` waits for. A row refused by
        multinomial's checks is reported there, per row (`SamplerOutput.invalid`): its
        generator has drawn, and its request fails."""
        return self._run(logits, rows, _start_copy)

    def _run(
        self,
        logits: torch.Tensor,
        rows: Sequence[SamplingRow],
        then: Callable[[SampleLaunch], _Result],
    ) -> _Result:
        """The call's device work, then `then` on it; if either raises, every generator is
        put back as it was (as multinomial, a failed call draws nothing)."""
        _check_shape(logits, rows)
        plan = _Plan.of(rows, logits.shape[-1], logits.device)
        sampling = sorted(plan.full + plan.top_k)  # the noise rows follow the batch order
        # The draws' noise depends on the generators alone: its fills start now.
        fills = NoiseFills(
            [rows[i].generator for i in sampling], self.generator, logits.shape[-1], logits.device
        )
        try:
            noise_of = {i: j for j, i in enumerate(sampling)}
            return then(self._launch(logits, rows, plan, fills, noise_of))
        except BaseException:
            fills.rewind()
            raise

    def _launch(
        self,
        logits: torch.Tensor,
        rows: Sequence[SamplingRow],
        plan: _Plan,
        fills: NoiseFills,
        noise_of: dict[int, int],
    ) -> SampleLaunch:
        """The rows in plan order: greedy [0, ng), full-row sampling [ng, nf), top-k [nf, S);
        the float32 copy (HF's) is the gather into that order."""
        order = plan.order
        device = logits.device
        vocab = logits.shape[-1]
        prow = [rows[i] for i in order]
        ng, nf, size = len(plan.greedy), len(plan.greedy) + len(plan.full), len(rows)
        # Host plan first: what the device work below reads is staged for one copy. Rows of
        # the (CPU-only) top-k path are known after their warpers ran: those plan late.
        inputs = DeviceInputs(device, self.uploads)
        gather = None if order == list(range(size)) else inputs.rows(order)
        sampled = list(range(ng, nf))
        early = nf == size  # no top-k path rows: every selection is known now
        warp_stages = plan_warpers(prow, sampled, vocab, inputs) if early and sampled else []
        draw_rows = inputs.rows(sampled)
        noise_rows = inputs.rows([fills.row[noise_of[order[p]]] for p in sampled])
        logprob_rows = [m for m in range(nf) if prow[m].logprob]
        logprob_sel = inputs.rows(logprob_rows)
        asking = [p for p, r in enumerate(prow) if r.top_n > 0]
        asking_sel = inputs.rows(asking) if early else None
        inputs.upload()

        if logits.dtype == torch.float32 and not plan.full and not plan.top_k and _read_only(rows):
            scores = logits  # nothing writes to the scores: no copy (a greedy batch's case)
        elif gather is None:
            scores = logits.to(dtype=torch.float32, copy=True)
        else:
            scores = gather.take(logits).to(torch.float32)
        touched = [False] * size
        extra = self._before_warpers(scores, prow, touched)
        top_k, fast, slow = None, [], []
        if nf < size:
            top_k, fast, slow = warp_top_k_rows(scores[nf:], prow[nf:])
            fast, slow = [nf + j for j in fast], [nf + j for j in slow]
        full = sampled + slow
        if full:
            if not early:
                warp_stages = plan_warpers(prow, full, vocab, inputs)
                draw_rows = inputs.rows(full)
                noise_rows = inputs.rows([fills.row[noise_of[order[p]]] for p in full])
            run_warpers(scores, warp_stages, touched)
        if extra:
            apply_post(scores, extra, touched, self.fallback)
        tokens = torch.empty(size, dtype=torch.long, device=device)
        logprobs = torch.full((size,), math.nan, dtype=torch.float32, device=device)
        codes: torch.Tensor | None = None  # read back with the tokens: multinomial's checks
        if ng:
            tokens[:ng] = torch.argmax(scores[:ng], dim=-1)
        if full:
            probs = torch.softmax(draw_rows.take(scores), dim=-1)
            codes = invalid_codes(probs)
            draw_rows.put(tokens, gumbel_argmax(probs, noise_rows.take(fills.tensor())))
        if top_k is not None:
            idx = torch.tensor(fast, device=device)
            noise_rows_k = [fills.row[noise_of[order[p]]] for p in fast]
            tokens[idx], logprobs[idx] = draw_top_k_rows(
                top_k, fills.tensor(), noise_rows_k, fills.zero_rows()
            )
        slow_lp = [m for m in slow if prow[m].logprob]
        for members, sel in ((logprob_rows, logprob_sel), (slow_lp, None)):
            if members:  # every other row: a full-row log-softmax
                sel = sel if sel is not None else inputs.rows(members)
                chosen = sel.take(tokens)[:, None]
                lp = torch.log_softmax(sel.take(scores), dim=-1).gather(1, chosen)
                sel.put(logprobs, lp[:, 0])
        top = self._top_n(scores, prow, asking, asking_sel, inputs, top_k, fast)
        # What the host needs, packed for the call's one device-to-host copy.
        parts = [tokens, logprobs]
        if codes is not None:
            parts.append(codes)
        if top is not None:
            parts += [top[1].reshape(-1), top[2].reshape(-1)]
        packed = torch.cat([p.to(torch.float64) for p in parts])
        top_rows = None if top is None else (top[0], top[1].shape[-1])
        return SampleLaunch(tokens, order, full, top_rows, [r.top_n for r in prow], packed, logits)

    @staticmethod
    def _top_n(
        scores: torch.Tensor,
        prow: Sequence[SamplingRow],
        asking: list[int],
        asking_sel: RowSelection | None,
        inputs: DeviceInputs,
        top_k: TopKRows | None,
        fast: list[int],
    ) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        """The asking rows' (plan positions) top n processed log-probs and their token ids,
        on the device; n is the largest top_n asked (each row keeps its own)."""
        if not asking:
            return None
        in_fast = {p: j for j, p in enumerate(fast)}
        plain = [p for p in asking if p not in in_fast]
        sparse = [p for p in asking if p in in_fast]
        parts = []
        if plain:
            sel = asking_sel if asking_sel is not None and not sparse else inputs.rows(plain)
            parts.append(sel.take(scores))
        if sparse:
            assert top_k is not None
            parts.append(top_k.full([in_fast[p] for p in sparse]))
        lp = torch.log_softmax(torch.cat(parts) if len(parts) > 1 else parts[0], dim=-1)
        n = min(max(prow[p].top_n for p in asking), lp.shape[-1])
        values, top = torch.topk(lp, n, dim=-1)
        return plain + sparse, values, top


def _read_now(launch: SampleLaunch) -> SamplerOutput:
    """`sample`'s end: the results read at once; multinomial's error for a refused row."""
    out = launch.finish()
    if out.invalid:
        raise multinomial_error(next(iter(out.invalid.values())))
    return out


def _start_copy(launch: SampleLaunch) -> SampleLaunch:
    """`launch`'s end: the copy back started, nothing read."""
    launch.start_copy()
    return launch


def _read_only(rows: Sequence[SamplingRow]) -> bool:
    """No processor changes any row's scores: no options, guidance, grammar or active
    min-length (the only steps that run for rows without options, apply_processors)."""
    return all(
        r.options is None and r.uncond_logits is None and r.constraint is None and not r.bans_eos
        for r in rows
    )


def _check_shape(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")


def _unpermute(values: list, order: list[int]) -> list:
    out = [values[0]] * len(values) if values else []
    for p, i in enumerate(order):
        out[i] = values[p]
    return out
