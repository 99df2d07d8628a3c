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
draws alone, on its own [1, V] slice, with its own generator (`make_generator`), so its draws
do not depend on the rest of the batch. Unseeded rows share one batched multinomial.

Log-probs: `logprobs` is log_softmax of the raw float32 logits (HF's output_logits);
`processed_logprobs` is log_softmax of the processed scores (HF's output_scores), the
distribution the token was actually chosen from; top-n alternatives rank by the latter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from app.engine.logits_processors import Extra, HFRowFallback, apply_post, apply_processors
from app.engine.logits_warpers import apply_warpers
from app.engine.sampling_params import SamplingParams
from app.engine.seeded_draw import draw_seeded

if TYPE_CHECKING:
    from app.engine.grammar import TokenConstraint


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator: same stream as `torch.manual_seed(seed)` gives that device."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence this step."""

    token_ids: Sequence[int]  # prompt + output so far (HF's input_ids)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_length: int = 0  # eos is banned while len(token_ids) < min_length
    eos_token_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None  # None: the unseeded (batched) draw
    prompt_len: int = 0  # HF's input_ids_seq_length (begin_suppress_tokens, length penalty)
    max_length: int = 0  # total length at which generation stops (forced_eos_token_id)
    options: SamplingParams | None = None  # set only when params.has_logits_options
    top_n: int = 0  # top alternatives to report
    # Classifier-free guidance: the companion (negative prompt) sequence's logits row.
    guidance_scale: float = 1.0
    uncond_logits: torch.Tensor | None = None
    # grammar / allowed_token_ids: this sequence's TokenConstraint (grammar.py), or None.
    constraint: TokenConstraint | None = None

    @classmethod
    def from_params(
        cls,
        params: SamplingParams,
        token_ids: Sequence[int],
        prompt_len: int,
        generator: torch.Generator | None = None,
    ) -> SamplingRow:
        return cls(
            token_ids=token_ids,
            do_sample=params.do_sample,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_length=params.min_total_length(prompt_len),
            eos_token_ids=params.eos_token_ids,
            generator=generator,
            prompt_len=prompt_len,
            max_length=params.stop_length(prompt_len),
            options=params if params.has_logits_options else None,
            top_n=params.top_n_tokens,
        )


@dataclass
class SamplerOutput:
    """Per row: the chosen token, its log-probs, and the top-n alternatives when asked."""

    token_ids: list[int]
    # log_softmax of the RAW float32 logits at the chosen token (HF's output_logits).
    logprobs: list[float]
    # log_softmax of the PROCESSED scores at the chosen token (HF's output_scores); equal to
    # `logprobs` for a row no processor changed.
    processed_logprobs: list[float] = field(default_factory=list)
    # The row's `top_n` most likely tokens under the processed scores, best first, and their
    # processed log-probs; removed tokens (-inf) are left out. [] when top_n = 0.
    top_token_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


class Sampler:
    """Chooses one token per row; rows differ in strategy, processors and generator."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Generator for unseeded sampling rows; None draws from torch's default generator.
        self.generator = generator
        self.fallback = HFRowFallback()

    def process(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> tuple[torch.Tensor, list[bool]]:
        """HF's processed scores per row (what output_scores holds), and which rows changed."""
        scores = self._float32(logits, rows)
        return scores, self._process(scores, rows)

    @staticmethod
    def _float32(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        # HF copies the last-position logits to float32 before any processor.
        return logits.to(dtype=torch.float32, copy=True)

    def _process(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> list[bool]:
        """Every processor in HF's order, in place; returns which rows they may have changed."""
        touched = [False] * len(rows)
        self._guidance(scores, rows, touched)
        extra: Extra = [(i, r, r.options) for i, r in enumerate(rows) if r.options is not None]
        apply_processors(scores, rows, extra, touched)
        sample_rows = [i for i, r in enumerate(rows) if r.do_sample]
        if sample_rows:
            apply_warpers(scores, rows, sample_rows, touched)
        if extra:
            apply_post(scores, extra, touched, self.fallback)
        return touched

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
        scores = self._float32(logits, rows)
        raw_logprobs = torch.log_softmax(scores, dim=-1)
        touched = self._process(scores, rows)
        device = scores.device
        greedy_rows = [i for i, r in enumerate(rows) if not r.do_sample]
        sample_rows = [i for i, r in enumerate(rows) if r.do_sample]
        tokens = torch.empty(len(rows), dtype=torch.long, device=device)
        if greedy_rows:
            idx = torch.tensor(greedy_rows, device=device)
            tokens[idx] = torch.argmax(scores[idx], dim=-1)
        if sample_rows:
            idx = torch.tensor(sample_rows, device=device)
            probs = torch.softmax(scores[idx], dim=-1)
            tokens[idx] = self._draw(probs, [rows[i] for i in sample_rows])
        return self._output(scores, raw_logprobs, tokens, rows, touched)

    @staticmethod
    def _output(
        scores: torch.Tensor,
        raw_logprobs: torch.Tensor,
        tokens: torch.Tensor,
        rows: Sequence[SamplingRow],
        touched: list[bool],
    ) -> SamplerOutput:
        device = scores.device
        raw = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        processed = raw.clone()
        changed = [i for i, t in enumerate(touched) if t]
        if changed:  # an untouched row's processed scores are its raw logits: same log-probs
            idx = torch.tensor(changed, device=device)
            lp = torch.log_softmax(scores[idx], dim=-1)
            processed[idx] = lp.gather(1, tokens[idx, None]).squeeze(1)
        out = SamplerOutput(tokens.tolist(), *torch.stack([raw, processed]).tolist())
        out.top_token_ids = [[] for _ in rows]
        out.top_logprobs = [[] for _ in rows]
        asking = [i for i, r in enumerate(rows) if r.top_n > 0]
        if asking:
            idx = torch.tensor(asking, device=device)
            lp = torch.log_softmax(scores[idx], dim=-1)
            n = min(max(rows[i].top_n for i in asking), lp.shape[-1])
            values, ids = torch.topk(lp, n, dim=-1)
            for j, (vals, toks) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
                i = asking[j]
                keep = [k for k in range(min(rows[i].top_n, n)) if math.isfinite(vals[k])]
                out.top_token_ids[i] = [toks[k] for k in keep]
                out.top_logprobs[i] = [vals[k] for k in keep]
        return out

    def _draw(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        out = torch.empty(len(rows), dtype=torch.long, device=probs.device)
        shared = [j for j, row in enumerate(rows) if row.generator is None]
        if shared:
            idx = torch.tensor(shared, device=probs.device)
            out[idx] = torch.multinomial(probs[idx], 1, generator=self.generator).squeeze(1)
        seeded = [j for j, row in enumerate(rows) if row.generator is not None]
        if seeded:
            # Each row draws as HF's batch of one with its own generator (seeded_draw.py).
            idx = torch.tensor(seeded, device=probs.device)
            generators = [rows[j].generator for j in seeded]
            out[idx] = draw_seeded(probs[idx], generators)  # type: ignore[arg-type]
        return out
