"""Batched logits processing and token choice, identical to transformers' `_sample` loop.

For one row, `model.generate` does (transformers 5.23, GenerationMixin._sample):
    scores = logits[:, -1].to(float32)
    MinLength / MinNewTokens processors: eos -> -inf while the sequence is too short
    if do_sample: TemperatureLogitsWarper (t != 1), TopKLogitsWarper (k != 0),
                  TopPLogitsWarper (p < 1), each with filter value -inf, min_tokens_to_keep 1
                  probs = softmax(scores); token = multinomial(probs, 1)
    else:         token = argmax(scores)
Here the same tensor ops run on a [S, V] batch with per-row settings. Every op is row-wise
(element-wise, or a reduction/sort/scan along the vocab), so a row's values are bit-identical
to the [1, V] computation. Temperature is applied as a division by a Python float per distinct
value (not by a per-row tensor) because CUDA implements `tensor / scalar` as a multiplication
by the reciprocal, which a tensor divisor would not reproduce.

Seeds: `torch.manual_seed(s); model.generate(...)` draws from the default generator, and
multinomial on a [1, V] row consumes V exponential samples per step. A seeded row therefore
draws alone, on its own [1, V] slice, with its own generator (`make_generator`), so its draws
do not depend on the rest of the batch. Unseeded rows share one batched multinomial.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator: same stream as `torch.manual_seed(seed)` gives that device."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence this step."""

    token_ids: Sequence[int]  # prompt + output so far
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_length: int = 0  # eos is banned while len(token_ids) < min_length
    eos_token_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None  # None: the unseeded (batched) draw

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
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # log_softmax of the RAW float32 logits at the chosen token (before min-length masking and
    # warpers), i.e. HF's output_logits passed through log_softmax, not output_scores.
    logprobs: list[float]


class Sampler:
    """Chooses one token per row; rows differ in strategy, warpers and generator."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Generator for unseeded sampling rows; None draws from torch's default generator.
        self.generator = generator

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        device = logits.device
        # HF copies the last-position logits to float32 before any processor.
        scores = logits.to(dtype=torch.float32, copy=True)
        raw_logprobs = torch.log_softmax(scores, dim=-1)
        scores = self._ban_eos(scores, rows)

        sample_rows = [i for i, r in enumerate(rows) if r.do_sample]
        greedy_rows = [i for i, r in enumerate(rows) if not r.do_sample]
        tokens = torch.empty(len(rows), dtype=torch.long, device=device)
        if greedy_rows:
            idx = torch.tensor(greedy_rows, device=device)
            tokens[idx] = torch.argmax(scores[idx], dim=-1)
        if sample_rows:
            idx = torch.tensor(sample_rows, device=device)
            sub = self._warp(scores[idx], [rows[i] for i in sample_rows])
            probs = torch.softmax(sub, dim=-1)
            tokens[idx] = self._draw(probs, [rows[i] for i in sample_rows])
        logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        return SamplerOutput(tokens.tolist(), logprobs.tolist())

    @staticmethod
    def _ban_eos(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """MinLengthLogitsProcessor / MinNewTokensLengthLogitsProcessor for every row at once."""
        vocab = scores.shape[-1]
        ban_r: list[int] = []
        ban_c: list[int] = []
        for i, row in enumerate(rows):
            if row.eos_token_ids and len(row.token_ids) < row.min_length:
                for eos in row.eos_token_ids:
                    if 0 <= eos < vocab:  # HF's isin() ignores ids outside the vocab
                        ban_r.append(i)
                        ban_c.append(eos)
        if ban_r:
            at = (
                torch.tensor(ban_r, device=scores.device),
                torch.tensor(ban_c, device=scores.device),
            )
            scores[at] = _NEG_INF
        return scores

    @staticmethod
    def _warp(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k, top-p in HF's order, each only on the rows that enable it."""
        device = scores.device
        vocab = scores.shape[-1]

        by_temp: dict[float, list[int]] = defaultdict(list)
        for j, row in enumerate(rows):
            if row.temperature != 1.0:
                by_temp[row.temperature].append(j)
        for temp, members in by_temp.items():
            idx = torch.tensor(members, device=device)
            scores[idx] = scores[idx] / temp  # Python float divisor, exactly as HF

        k_rows = [j for j, row in enumerate(rows) if row.top_k != 0]
        if k_rows:
            idx = torch.tensor(k_rows, device=device)
            # TopKLogitsWarper: k = max(top_k, min_tokens_to_keep) clipped to the vocab; every
            # token scoring below the k-th largest value goes (ties with it stay).
            ks = [min(max(rows[j].top_k, 1), vocab) for j in k_rows]
            sub = scores[idx]
            top_vals = torch.topk(sub, max(ks), dim=-1).values
            kth = top_vals.gather(1, torch.tensor(ks, device=device)[:, None] - 1)
            scores[idx] = sub.masked_fill(sub < kth, _NEG_INF)

        p_rows = [j for j, row in enumerate(rows) if row.top_p < 1.0]
        if p_rows:
            idx = torch.tensor(p_rows, device=device)
            sub = scores[idx]
            sorted_logits, sorted_indices = torch.sort(sub, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # HF compares with the Python float (1 - top_p), which torch casts to float32.
            threshold = torch.tensor(
                [1.0 - rows[j].top_p for j in p_rows], dtype=torch.float32, device=device
            )
            remove = cumulative <= threshold[:, None]
            remove[..., -1:] = False  # min_tokens_to_keep = 1
            remove = remove.scatter(1, sorted_indices, remove)
            scores[idx] = sub.masked_fill(remove, _NEG_INF)
        return scores

    def _draw(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        out = torch.empty(len(rows), dtype=torch.long, device=probs.device)
        shared = [j for j, row in enumerate(rows) if row.generator is None]
        if shared:
            idx = torch.tensor(shared, device=probs.device)
            out[idx] = torch.multinomial(probs[idx], 1, generator=self.generator).squeeze(1)
        for j, row in enumerate(rows):
            if row.generator is not None:
                # Same [1, V] shape as HF's batch of one, so the generator advances identically.
                out[j] = torch.multinomial(probs[j : j + 1], 1, generator=row.generator)[0, 0]
        return out
