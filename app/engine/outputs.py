"""What the engine returns per step: per request, the new output of each of its sequences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.engine.core.request import FinishReason


@dataclass
class GeneratedToken:
    """One generated token with its log-probs: the one type from the sampler to the wire."""

    id: int
    # log_softmax of the processed scores (what the token was drawn from; HF output_scores);
    # None when nothing shows or ranks by it (SamplingParams.logprobs false)
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)  # top_n_tokens, best first
    text: str = ""  # the text it completes (UTF-8 complete, stop strings cut)


@dataclass
class PromptLogprob:
    """One prompt token's log-prob given the tokens before it: log_softmax of the model's
    logits at the previous position (no logits processing, as HF's forward returns them)."""

    id: int
    logprob: float
    rank: int  # 1 + the number of other tokens at least as likely (vLLM's rank)
    top: list[tuple[int, float]] = field(default_factory=list)  # prompt_logprobs best, best first


@dataclass
class SequenceOutput:
    """What one sequence produced in one step (deltas), plus running totals."""

    index: int
    text: str  # new text, UTF-8 complete, stop strings cut: the tokens' texts joined
    tokens: list[GeneratedToken]
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    score: float | None = None  # beam search: the hypothesis' sequence score

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def logprobs(self) -> list[float]:
        return [t.logprob for t in self.tokens if t.logprob is not None]

    @property
    def top_token_ids(self) -> list[list[int]]:
        return [[i for i, _ in t.top] for t in self.tokens]

    @property
    def top_logprobs(self) -> list[list[float]]:
        return [[lp for _, lp in t.top] for t in self.tokens]


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[SequenceOutput]
    finished: bool
    error: str | None = None
    # "invalid_request": the request could not be admitted (the caller's input); "internal".
    error_kind: str | None = None
    error_field: str | None = None  # the request field an invalid_request error is about
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # The exact lane's diagnostic tensors as nested lists ("attentions", "hidden_states").
    diagnostics: dict[str, list[Any]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # SamplingParams.prompt_logprobs: one entry per prompt token, None first (no context);
    # on the request's first output only.
    prompt_logprobs: list[PromptLogprob | None] | None = None
