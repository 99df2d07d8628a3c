"""Multinomial's noise for a step's sampling rows, filled ahead of the logits, and its draws.

For one sample, torch's multinomial is `argmax(p / q)` with `q = empty_like(p).exponential_(1,
g)` (the Gumbel trick, aten/src/ATen/native/Distributions.cpp), after checking p. Filling q
is nearly all of its cost (V serial draws from the generator), and q depends on the
generator only, not on the logits. So `NoiseFills` starts the fills as soon as the step's
sampling rows are known: on CPU in a small thread pool (torch releases the GIL), one task
per generator, overlapping the logits processing. Rows sharing a generator (unseeded rows on
the engine's generator, a request's n > 1 siblings) fill one block in row order, in one
call: the numbers one batched multinomial over those rows would use. If the sampler call
fails, `rewind` puts every generator back where it was, as multinomial raises before it
draws; a retry then draws the same numbers. Rows whose probabilities are invalid fail with
multinomial's own error (`invalid_codes`, a code per row read back with the tokens; then
`multinomial_error`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=max(1, torch.get_num_threads()), thread_name_prefix="seeded-draw"
        )
    return _pool


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator `generator=None` means on this device (torch.manual_seed's)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ]
    return torch.default_generator


class NoiseFills:
    """Exponential noise [n, V] for n sampling rows, row j drawn from `generators[j]`
    (None: `shared`, or torch's default generator when that is None too)."""

    def __init__(
        self,
        generators: Sequence[torch.Generator | None],
        shared: torch.Generator | None,
        vocab: int,
        device: torch.device,
    ) -> None:
        process_default = _default_generator(device)
        groups: dict[int, list[int]] = {}
        by_key: dict[int, torch.Generator] = {}
        for j, gen in enumerate(generators):
            gen = gen if gen is not None else shared if shared is not None else process_default
            groups.setdefault(id(gen), []).append(j)
            by_key[id(gen)] = gen
        # Noise row of each sampling row: every generator's rows form one block.
        self.row = [0] * len(generators)
        self.noise = torch.empty(len(generators), vocab, dtype=torch.float32, device=device)
        self._states = [(gen, gen.get_state()) for gen in by_key.values()]
        self._tasks: list[Future[None]] = []
        self._deferred: list[tuple[torch.Generator, int, int]] = []
        self._zero = torch.empty(len(generators), dtype=torch.bool, device=device)
        start = 0
        for key, members in groups.items():
            for offset, j in enumerate(members):
                self.row[j] = start + offset
            gen = by_key[key]
            if device.type != "cpu":  # asynchronous kernels already
                self._fill(gen, start, len(members))
            elif gen is process_default:  # shared with other code: filled in this thread
                self._deferred.append((gen, start, len(members)))
            else:
                self._tasks.append(_executor().submit(self._fill, gen, start, len(members)))
            start += len(members)

    def _fill(self, gen: torch.Generator, start: int, count: int) -> None:
        block = self.noise[start : start + count].exponential_(1.0, generator=gen)
        self._zero[start : start + count] = block.amin(dim=-1) == 0  # -0.0 included

    def tensor(self) -> torch.Tensor:
        """The noise, once every fill is done."""
        for task in self._tasks:
            task.result()
        self._tasks = []
        for gen, start, count in self._deferred:
            self._fill(gen, start, count)
        self._deferred = []
        return self.noise

    def zero_rows(self) -> torch.Tensor:
        """[n] whether a noise row holds an exact 0 (probability ~2^-53 per value)."""
        self.tensor()
        return self._zero

    def rows(self, members: Sequence[int]) -> torch.Tensor:
        """The noise rows of these sampling rows, [len(members), V]."""
        noise = self.tensor()
        index = [self.row[j] for j in members]
        if not index or index == list(range(index[0], index[0] + len(index))):
            return noise[index[0] if index else 0 :][: len(index)]
        return noise.index_select(0, torch.tensor(index, device=noise.device))

    def rewind(self) -> None:
        """Every generator back to its state before the fills (the call failed)."""
        for task in self._tasks:
            task.exception()  # waits; a failed fill changes nothing more
        self._tasks = []
        self._deferred = []
        for gen, state in self._states:
            gen.set_state(state)


# multinomial's verdict on one row of probabilities, as `invalid_codes` reports it.
VALID, BAD_VALUES, ZERO_SUM = 0, 1, 2


def invalid_codes(probs: torch.Tensor) -> torch.Tensor:
    """multinomial's checks row by row, on the device: [n] int64, VALID, BAD_VALUES (an inf,
    NaN or negative entry: its first check) or ZERO_SUM (its second). Read back with the
    tokens, so a row's failure is known per row without a sync here."""
    if probs.numel() == 0:
        return torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    bad = ~((probs.amax(1) < float("inf")) & (probs.amin(1) >= 0))  # NaN fails both
    zero = probs.sum(1) == 0
    return torch.where(bad, BAD_VALUES, torch.where(zero, ZERO_SUM, VALID))


def multinomial_error(code: int) -> RuntimeError:
    """The error torch.multinomial raises for a row with this `invalid_codes` code (its own
    message, from a one-entry row that fails the same check)."""
    row = torch.tensor([[float("nan") if code == BAD_VALUES else 0.0]])
    try:
        torch.multinomial(row, 1)
    except RuntimeError as err:
        return err
    raise AssertionError(f"code {code}: multinomial accepted the row")


def gumbel_argmax(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """multinomial(probs, 1) given its noise: argmax(p / q) per row."""
    return torch.argmax(probs / noise, dim=-1)
