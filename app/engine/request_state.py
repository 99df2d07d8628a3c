"""The engine's typed state of a request and of each of its sequences (the scheduler's
`Request` and `Sequence` stay ints only; what the engine adds lives here)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.engine.beam_search import BeamSearch
from app.engine.core.request import Request, Sequence
from app.engine.grammar import TokenConstraint
from app.engine.output_processor import OutputProcessor, SequenceText
from app.options.params import SamplingParams


@dataclass
class SequenceState:
    text: SequenceText | None = None  # None: beams (their results come whole)
    constraint: TokenConstraint | None = None  # grammar / allowed_token_ids: its matcher
    assistant_tokens: int | None = None  # draft-model schedules: drafts for the next round


@dataclass
class RequestState:
    request: Request
    params: SamplingParams
    output: OutputProcessor  # the one token -> output path (stop checks, text)
    generator: torch.Generator | None
    beam: BeamSearch | None = None
    companion: Sequence | None = None  # guidance: the negative-prompt sequence, not sampled
    sequences: dict[int, SequenceState] = field(default_factory=dict)  # by seq_id
    first_token_time: float | None = None
    deadline: float | None = None  # max_time: monotonic time after which generation stops

    def sequence(self, seq: Sequence) -> SequenceState:
        return self.sequences.setdefault(seq.seq_id, SequenceState())
