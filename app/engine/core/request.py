"""Request and sequence state shared by the scheduler and the engine (pure Python).

A `Request` is one API call; it owns one or more `Sequence`s (beams, num_return_sequences)
that advance in lockstep. Each sequence carries one number of progress:
`num_computed_tokens`, the count of its tokens whose KV is in the cache.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

_seq_ids = itertools.count()


def next_seq_id() -> int:
    return next(_seq_ids)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_len: int
    token_ids: list[int]  # prompt followed by generated tokens
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    # Speculative tokens proposed to follow token_ids; the scheduler computes them after the
    # last token in the next decode step and the engine verifies them (spec/decoder.py).
    spec_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_prompt(cls, prompt_token_ids: list[int]) -> Sequence:
        return cls(next_seq_id(), len(prompt_token_ids), list(prompt_token_ids))

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def fork(self) -> Sequence:
        return Sequence(
            next_seq_id(),
            self.prompt_len,
            list(self.token_ids),
            self.num_computed_tokens,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    seqs: list[Sequence]
    # Upper bound of tokens any one sequence may reach (prompt + max new tokens).
    max_total_tokens: int
    params: Any = None  # SamplingParams; opaque to the scheduler
    # Sequences the request can grow to by forking (beams, num_return_sequences).
    max_num_seqs: int = 1
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    finish_reason: FinishReason | None = None
    # Top alternatives of the prompt log-probs the engine still needs (None: none). While
    # set, the first sequence's prompt chunks ask for their logits and the prefix cache is
    # not looked up (a cached block has KV but no logits).
    prompt_logprobs: int | None = None
    # The LoRA adapter its sequences run with (opaque to the scheduler: handed to the model
    # runner on each ScheduledSeq; None: the base model) and the adapter's prefix-cache
    # namespace (0: the base): KV computed under one adapter is never reused by another.
    lora: Any = None
    cache_salt: int = 0
    # Which of the server's full models runs it (0: the default; the scheduler admits the
    # models' waiting requests in turn, the model runner runs one forward per model).
    model: int = 0

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
