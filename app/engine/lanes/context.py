"""What the exclusive lanes share: the engine's view they get, and the run protocol.

A request that the batched lane cannot serve (a class-B method, the exact lane's diagnostic
outputs) becomes a `LaneRun`. The engine steps each run once per engine step, on the engine
thread, between batch steps (the model has one owner), and reports its outputs on the same
stream as any other request's. A run gets a `LaneContext`, never the engine itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from app.engine.outputs import SequenceOutput
from app.options.params import SamplingParams


class LaneRequestError(ValueError):
    """The request's options fail when its method starts (the caller's input: a 422)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # the request field the error is about, when one is


@dataclass
class LaneContext:
    model: Any  # the transformers model (GPT2LMHeadModel)
    tokenizer: Any
    device: torch.device
    token_bytes: Callable[[], list[bytes]]  # the stop-string byte table (built once, lazily)
    heal: Callable[[list[int]], list[int]]  # generate's token healing of a prompt


class LaneRun(Protocol):
    prompt: list[int]
    finished: bool
    diagnostics: dict[str, list[Any]] | None

    def step(self) -> list[SequenceOutput]:
        """One step of the run's method; raises LaneRequestError for a bad request."""
        ...


def generate_kwargs(params: SamplingParams, healed: bool) -> dict[str, Any]:
    """The request's options for transformers' `model.generate`, as the engine means them."""
    kwargs = params.generate_kwargs
    if healed:  # the healed prompt may differ in length: count new tokens, as the engine does
        del kwargs["max_length"], kwargs["min_length"]
        kwargs["max_new_tokens"] = params.max_new_tokens
        if params.min_new_tokens:
            kwargs["min_new_tokens"] = params.min_new_tokens
    if params.ignore_eos:
        kwargs["eos_token_id"] = None  # our extension's meaning: generate(eos_token_id=None)
    if kwargs.get("watermarking_config") is not None:
        from transformers.generation import WatermarkingConfig

        kwargs["watermarking_config"] = WatermarkingConfig(**kwargs["watermarking_config"])
    return kwargs
