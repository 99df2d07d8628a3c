"""What every completion route shares: prompt checks, option resolution, running a request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from app.api.errors import APIError
from app.engine.async_engine import EngineNotRunningError, EngineQueueFullError
from app.engine.engine import RequestOutput
from app.engine.request import FinishReason
from app.engine.sampling_params import SamplingParams, resolve_sampling_params
from app.state import ServerState


def tokenize_prompt(state: ServerState, text: str, field_name: str = "inputs") -> list[int]:
    ids: list[int] = state.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError(
            422, f"`{field_name}` is empty: the prompt needs at least one token", field=field_name
        )
    check_prompt_length(state, ids, field_name)
    return ids


def check_prompt_length(state: ServerState, ids: list[int], field_name: str) -> None:
    if len(ids) > state.max_input_tokens:
        raise APIError(
            422,
            f"`{field_name}` has {len(ids)} tokens but at most {state.max_input_tokens} are "
            f"allowed (the model has {state.n_positions} positions)",
            field=field_name,
        )
    vocab = int(state.loaded.config.vocab_size)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            422, f"`{field_name}` has token id {bad}, outside [0, {vocab})", field=field_name
        )


def build_params(state: ServerState, options: dict[str, Any], prompt_len: int) -> SamplingParams:
    params = resolve_sampling_params(
        options, state.generation_defaults(), state.max_total_tokens, prompt_len
    )
    return params


@dataclass
class Completion:
    """A finished sequence, accumulated from the engine's stream."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None


async def stream_request(
    state: ServerState, prompt_ids: list[int], params: SamplingParams
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request; engine errors become APIErrors."""
    try:
        async for out in state.engine.generate(prompt_ids, params):
            if out.error is not None:
                raise APIError(500, f"generation failed: {out.error}", error_type="generation")
            yield out
    except EngineQueueFullError as err:
        raise APIError(429, str(err), "overloaded", headers={"Retry-After": "1"}) from err
    except EngineNotRunningError as err:
        raise APIError(503, str(err), "unavailable") from err


async def run_to_completion(
    state: ServerState, prompt_ids: list[int], params: SamplingParams
) -> list[Completion]:
    completions = [Completion() for _ in range(params.num_return_sequences)]
    async for out in stream_request(state, prompt_ids, params):
        for seq in out.outputs:
            c = completions[seq.index]
            c.text += seq.text
            c.token_ids += seq.token_ids
            c.logprobs += seq.logprobs
            if seq.finish_reason is not None:
                c.finish_reason = seq.finish_reason
    return completions
