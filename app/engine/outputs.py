"""What the engine returns per step: per request, the new output of each of its sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.engine.core.request import FinishReason


@dataclass
class SequenceOutput:
    """What one sequence produced in one step (deltas), plus running totals."""

    index: int
    text: str  # new text, UTF-8 complete, stop strings cut
    token_ids: list[int]  # new token ids
    # log_softmax of the processed scores (what the token was drawn from; HF output_scores)
    logprobs: list[float]
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    score: float | None = None  # beam search: the hypothesis' sequence score
    # Per new token, its top_n_tokens alternatives (ids and log-probs, best first).
    top_token_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[SequenceOutput]
    finished: bool
    error: str | None = None
    # "invalid_request": the request could not be admitted (the caller's input); "internal".
    error_kind: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)
