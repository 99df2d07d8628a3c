"""Seeded rows' draws: what `torch.multinomial(probs[1, V], 1, generator=g)` does, batched.

For one sample, torch's multinomial is `argmax(p / q)` with `q = empty_like(p).exponential_(1,
g)` (the Gumbel trick, aten/src/ATen/native/Distributions.cpp). Filling q is nearly all of
its cost (V serial draws from the generator). Requests have their own generators, so on CPU
the fills of different generators run in a small thread pool (torch releases the GIL), then
one batched divide + argmax picks every row's token. Rows whose probabilities are invalid go
through `torch.multinomial` itself, so they fail with its error, as `model.generate` would.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=max(1, torch.get_num_threads()), thread_name_prefix="seeded-draw"
        )
    return _pool


def _valid(probs: torch.Tensor) -> bool:
    """multinomial's own checks: finite, non-negative, and no row summing to zero."""
    ok = (probs.max() < float("inf")) & (probs.min() >= 0) & ~(probs.sum(1) == 0).any()
    return bool(ok)


def draw_seeded(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` [n, V], row j drawn with `generators[j]` alone."""
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
    if not _valid(probs):
        return torch.stack(
            [
                torch.multinomial(probs[j : j + 1], 1, generator=g)[0, 0]
                for j, g in enumerate(generators)
            ]
        )
    noise = torch.empty_like(probs)
    # Rows sharing a generator (a request's n > 1 siblings) fill in row order, one task: their
    # draws then equal one batched multinomial over those rows, as in generate.
    members: dict[int, list[int]] = {}
    for j, g in enumerate(generators):
        members.setdefault(id(g), []).append(j)

    def fill(rows: list[int]) -> None:
        for j in rows:
            noise[j].exponential_(1.0, generator=generators[j])

    if probs.device.type == "cpu" and len(members) > 1:
        for task in [_executor().submit(fill, rows) for rows in members.values()]:
            task.result()
    else:
        for rows in members.values():
            fill(rows)
    return torch.argmax(probs / noise, dim=-1)
