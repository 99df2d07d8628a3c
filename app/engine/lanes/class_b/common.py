"""What the class-B decoding methods share: their step protocol and the model calls.

Each method is a Python generator over one request that yields after every decoding step,
so the engine thread can run a batch step in between (runner.py advances it one step per
engine step). Token-by-token methods yield a `TokenChoice` per token;
beam methods yield None per step and a `BeamOutcome` at the end. A generator must not hold
a torch grad-mode context across a yield (the caller wraps every step in inference mode).

Inside a step a method calls `inputs.checkpoint()` between bounded chunks of work (before
and after a forward, per premature layer, per beam's constraint advances): it raises
`StepInterrupted` once the client has hung up or the request's max_time has passed, so
neither waits for the rest of a long step. Where a step is long (contrastive search's
candidate forward over many rows x positions, DoLa's many premature LM heads, constrained
beam search's per-beam constraint advances) the method also yields `PAUSE` between chunks:
the engine runs one chunk per engine step, so a small request arriving mid-step waits for
one chunk, not for the rest of the step (#21 fairness). The chunks are the same operations
on the same shapes as one unsplit step, except contrastive search's row groups (below).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList


@dataclass
class TokenChoice:
    """One generated token and the processed scores it was chosen from (HF output_scores)."""

    token: int
    scores: torch.Tensor  # [vocab]


@dataclass
class BeamOutcome:
    """The returned hypotheses, best first: generated token ids and the sequence score."""

    hypotheses: list[tuple[list[int], float]]


class Pause:
    """A chunk of a step is done; the step goes on at the next `next()` (engine step)."""


PAUSE = Pause()

# Bounds on one chunk's work. Contrastive search: candidate rows x cached positions per
# row group (each row copies the prompt's KV cache and attends over it: the step's cost).
CHUNK_ROW_POSITIONS = 2048
# DoLa: premature-layer LM-head logits (layers x vocabulary) per chunk.
CHUNK_HEAD_LOGITS = 262_144
# Constrained beam search: beams whose constraint advances run per chunk.
CHUNK_BEAMS = 1

Step = TokenChoice | BeamOutcome | Pause | None
StepIterator = Iterator[Step]

ABORTED, DEADLINE = "aborted", "deadline"


class StepInterrupted(Exception):
    """Raised by a checkpoint inside a step: the request was aborted, or its max_time passed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # ABORTED or DEADLINE


def never_interrupted() -> None:
    """The checkpoint of a run nobody can interrupt (tests, benchmarks, run_method)."""


@dataclass
class MethodInputs:
    """What every method gets: the model, the prompt, and what `model.generate` prepared."""

    model: Any  # transformers GPT2LMHeadModel (any causal LM with a DynamicCache)
    prompt_ids: list[int]
    processors: LogitsProcessorList
    stopping: StoppingCriteriaList
    generation_config: Any  # transformers GenerationConfig, resolved by generate
    generator: torch.Generator | None = None  # sampling (DoLa with do_sample)
    # Raises StepInterrupted when the request must stop now (called between chunks of a step).
    checkpoint: Callable[[], None] = field(default=never_interrupted)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device  # type: ignore[no-any-return]

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.generation_config._eos_token_tensor
        return [] if eos is None else [int(t) for t in eos.reshape(-1).tolist()]

    @property
    def pad_token_id(self) -> int | None:
        pad = self.generation_config._pad_token_tensor
        return None if pad is None else int(pad)

    def prompt_tensor(self, rows: int = 1) -> torch.Tensor:
        ids = torch.tensor([self.prompt_ids], device=self.device)
        return ids.repeat(rows, 1) if rows > 1 else ids

    def forward(self, input_ids: torch.Tensor, cache: Any, hidden_states: bool = False) -> Any:
        """One causal-LM forward over `input_ids` (the new tokens) after `cache`."""
        return self.model(
            input_ids=input_ids,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=hidden_states,
            return_dict=True,
        )

    def should_stop(self, input_ids: torch.Tensor) -> bool:
        """generate's stopping criteria: true when every row is done (4.x's beam rule)."""
        return bool(self.stopping(input_ids, None).all())


def beam_prefill(inputs: MethodInputs, num_beams: int) -> tuple[Any, torch.Tensor]:
    """The prompt's forward once, cache and last logits repeated for every beam (generate
    prefills num_beams identical rows; each row computes the same values)."""
    out = inputs.forward(inputs.prompt_tensor(), None)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_beams)
    return cache, out.logits[:, -1, :].expand(num_beams, -1)
