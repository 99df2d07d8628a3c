"""What every completion route shares: prompts, options, admission, running and tracking a request.

`stream_request` is the one way the HTTP side talks to the engine: it maps engine errors to
APIErrors, records the request's metrics (TTFT, inter-token latency, token counts, finish
reason) and writes one structured log line per engine request (no text unless
--log-prompts). Closing it early (client gone, shutdown cut-off) aborts the engine request,
which frees its KV blocks at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from app.api.errors import APIError, param_error
from app.api.option_routing import split_options
from app.engine.async_engine import EngineNotRunningError, EngineQueueFullError
from app.engine.core.request import FinishReason
from app.engine.lanes.class_b.options import ClassBParams, resolve_class_b
from app.engine.lanes.class_b.runner import generate_class_b
from app.engine.outputs import RequestOutput, SequenceOutput
from app.engine.sampling_params import (
    ParamValidationError,
    SamplingParams,
    resolve_sampling_params,
)
from app.state import ServerState

logger = logging.getLogger("kogpt.request")


@dataclass
class RequestContext:
    """What a route knows about its HTTP request, for metrics and logs."""

    endpoint: str
    request_id: str
    user: str | None = None
    prompt_text: str | None = None  # logged only with --log-prompts


def encode(state: ServerState, text: str) -> list[int]:
    return list(state.tokenizer(text, add_special_tokens=False)["input_ids"])


def check_prompt_ids(state: ServerState, ids: list[int], field_name: str) -> None:
    if not ids:
        raise APIError(
            422, f"`{field_name}` is empty: the prompt needs at least one token", field=field_name
        )
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


def decoder(state: ServerState) -> Callable[[list[int]], str]:
    """Token ids -> text as the engine's detokenizer makes it (special tokens skipped)."""
    tokenizer = state.tokenizer
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def build_params(
    state: ServerState,
    options: dict[str, Any],
    prompt_len: int,
    renames: dict[str, str] | None = None,
    *,
    exact_lane: bool = False,
    logprobs: bool = True,
) -> SamplingParams:
    """Route the options by the option table, then resolve and validate them; a bad option is
    a 422 named as the caller named it. `exact_lane`: the caller serves output_attentions /
    output_hidden_states (app/api/exact_lane.py); elsewhere they are a 422. `logprobs`:
    False when the response shows no token log-prob and none ranks the sequences (the
    engine then skips their full-row log-softmax)."""
    renames = {"inputs": "inputs", **(renames or {})}
    try:
        split = split_options(options, draft_model=state.settings.draft_model is not None)
        if split.exact and not exact_lane:
            name = split.exact[0]
            raise ParamValidationError(
                name,
                f"`{name}` is served by the exact lane of POST /generate, POST / and "
                "/v1/completions without streaming only",
            )
        constrained = [n for n in ("grammar", "allowed_token_ids") if split.engine.get(n)]
        if split.exact and constrained:  # the exact lane runs generate without the constraint
            raise ParamValidationError(
                constrained[0], f"`{constrained[0]}` is not served with `{split.exact[0]}`"
            )
        engine = split.engine
        negative = engine.pop("negative_prompt", None)
        if negative is not None:
            if engine.get("negative_prompt_ids") is not None:
                raise ParamValidationError(
                    "negative_prompt", "give `negative_prompt` or `negative_prompt_ids`, not both"
                )
            engine["negative_prompt_ids"] = encode(state, negative)
            renames.setdefault("negative_prompt_ids", "negative_prompt")
        params = resolve_sampling_params(
            engine,
            state.generation_defaults(),
            state.max_total_tokens,
            prompt_len,
            encode=lambda text: encode(state, text),
            vocab_size=int(state.loaded.config.vocab_size),
        )
        # Several sequences: the routes rank them by summed log-probs (best_of, TGI order).
        params.logprobs = logprobs or params.num_return_sequences > 1
        if not split.class_b:
            return params
        params = resolve_class_b(
            split.class_b,
            params,
            num_layers=int(state.loaded.config.n_layer),
            vocab_size=int(state.loaded.config.vocab_size),
            encode=lambda text: encode(state, text),
        )
        if split.exact and isinstance(params, ClassBParams):
            raise ParamValidationError(
                split.exact[0], f"`{split.exact[0]}` is not served with a class-B decoding method"
            )
        return params
    except ParamValidationError as exc:
        raise param_error(exc, renames) from exc


def admission_error(err: EngineQueueFullError | EngineNotRunningError) -> APIError:
    if isinstance(err, EngineQueueFullError):
        return APIError(429, str(err), "overloaded", headers={"Retry-After": "1"})
    return APIError(503, str(err), "unavailable", headers={"Retry-After": "5"})


def admit(state: ServerState) -> None:
    """Refuse at once when the engine cannot take the request (before any response starts)."""
    try:
        state.engine.check_admission()
    except (EngineQueueFullError, EngineNotRunningError) as err:
        raise admission_error(err) from err


def engine_error(out: RequestOutput, produced_tokens: bool) -> APIError:
    message = out.error or "unknown error"
    if out.error_kind == "invalid_request" and not produced_tokens:
        return APIError(422, message.split(": ", 1)[-1], "validation")
    return APIError(500, f"generation failed: {message}", "generation")


async def stream_request(
    state: ServerState, ctx: RequestContext, prompt_ids: list[int], params: SamplingParams
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request, with metrics and a log line."""
    metrics = state.metrics
    start = time.perf_counter()
    first: float | None = None
    last = start
    generated = 0
    reason = "abort"
    admitted = True  # false only when the engine refuses it (queue full, not running)
    preemptions = 0
    texts: list[str] = []
    state.inflight += 1
    try:
        if isinstance(params, ClassBParams):  # one step at a time between batch steps
            source = generate_class_b(state.engine, prompt_ids, params)
        else:
            source = state.engine.generate(prompt_ids, params)
        async with aclosing(source) as outputs:
            async for out in outputs:
                if out.error is not None:
                    reason = "error"
                    raise engine_error(out, generated > 0)
                # Tokens per sequence this step (speculative decoding may deliver several,
                # one SequenceOutput each).
                counts: dict[int, int] = {}
                for s in out.outputs:
                    counts[s.index] = counts.get(s.index, 0) + len(s.token_ids)
                per_seq = max(counts.values(), default=0)
                if per_seq:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        metrics.observe_first_token(ctx.endpoint, now - start)
                    else:
                        metrics.observe_inter_token(ctx.endpoint, now - last, per_seq)
                    last = now
                    generated += sum(len(s.token_ids) for s in out.outputs)
                if state.settings.log_prompts:
                    texts += [s.text for s in out.outputs if s.index == 0]
                preemptions = out.num_preemptions
                if out.finished:
                    reasons = [s.finish_reason for s in out.outputs if s.finish_reason]
                    reason = (reasons[0] if reasons else FinishReason.LENGTH).value
                yield out
    except (EngineQueueFullError, EngineNotRunningError) as err:
        admitted, reason = False, "rejected"
        raise admission_error(err) from err
    finally:
        state.inflight -= 1
        if admitted:
            metrics.observe_finished(ctx.endpoint, reason, len(prompt_ids), generated)
        record: dict[str, Any] = {
            "event": "generation",
            "request_id": ctx.request_id,
            "endpoint": ctx.endpoint,
            "prompt_tokens": len(prompt_ids),
            "generated_tokens": generated,
            "finish_reason": reason,
            "ttft_s": None if first is None else round(first - start, 4),
            "latency_s": round(time.perf_counter() - start, 4),
            "preemptions": preemptions,
            "user": ctx.user,
        }
        if state.settings.log_prompts:
            record["prompt"] = ctx.prompt_text
            record["output"] = "".join(texts)
        logger.info(json.dumps(record, ensure_ascii=False))


@dataclass
class TokenStep:
    """One generated token with the text it completes (UTF-8 safe) and its alternatives."""

    id: int
    text: str
    logprob: float | None
    top: list[tuple[int, float]]


def _top_alternatives(seq: SequenceOutput, k: int) -> list[tuple[int, float]]:
    """Token k's top_n_tokens alternatives, best first ([] when none were asked for)."""
    if k >= len(seq.top_token_ids):
        return []
    return list(zip(seq.top_token_ids[k], seq.top_logprobs[k], strict=True))


def split_text(text: str, token_ids: list[int], decode: Callable[[list[int]], str]) -> list[str]:
    """Share a multi-token delta's text among its tokens (beam search delivers a whole
    sequence at once): each token gets what it completes, never a broken character; the
    pieces always concatenate to `text` (the rest goes to the last token)."""
    pieces: list[str] = []
    emitted = ""
    for k in range(len(token_ids) - 1):
        prefix = decode(token_ids[: k + 1])
        piece = ""
        if not prefix.endswith("\ufffd") and prefix.startswith(emitted):
            candidate = prefix[len(emitted) :]
            if text.startswith(emitted + candidate):
                piece = candidate
        pieces.append(piece)
        emitted += piece
    pieces.append(text[len(emitted) :])
    return pieces


def token_steps(
    seq: SequenceOutput, decode: Callable[[list[int]], str] | None = None
) -> list[TokenStep]:
    """A sequence's delta as per-token steps. One token: it gets the delta's text. Several
    (beam results): the text is split with `decode`, or all goes with the last token."""
    n = len(seq.token_ids)
    if n > 1 and decode is not None:
        texts = split_text(seq.text, list(seq.token_ids), decode)
    else:
        texts = ["" for _ in range(n - 1)] + [seq.text] if n else []
    steps = []
    for k, token in enumerate(seq.token_ids):
        logprob = seq.logprobs[k] if k < len(seq.logprobs) else None
        steps.append(TokenStep(token, texts[k], logprob, _top_alternatives(seq, k)))
    return steps


@dataclass
class Completion:
    """A finished sequence, accumulated from the engine's stream."""

    index: int = 0
    text: str = ""
    steps: list[TokenStep] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    score: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return [s.id for s in self.steps]

    @property
    def cumulative_logprob(self) -> float:
        if self.score is not None:
            return self.score
        return sum(s.logprob for s in self.steps if s.logprob is not None)

    def add(
        self, seq: SequenceOutput, decode: Callable[[list[int]], str] | None = None
    ) -> list[TokenStep]:
        steps = token_steps(seq, decode)
        self.text += seq.text
        self.steps += steps
        if seq.finish_reason is not None:
            self.finish_reason = seq.finish_reason
        score = getattr(seq, "score", None)
        if score is not None:
            self.score = score
        return steps


async def run_to_completion(
    state: ServerState, ctx: RequestContext, prompt_ids: list[int], params: SamplingParams
) -> list[Completion]:
    completions = [Completion(i) for i in range(params.num_return_sequences)]
    async with aclosing(stream_request(state, ctx, prompt_ids, params)) as outputs:
        async for out in outputs:
            for seq in out.outputs:
                while seq.index >= len(completions):
                    completions.append(Completion(len(completions)))
                completions[seq.index].add(seq, decoder(state))
    return completions


def finish_name(reason: FinishReason | None) -> str:
    """TGI's finish reason names (an unfinished sequence reports length)."""
    if reason in (FinishReason.EOS, FinishReason.STOP):
        return reason.value
    return FinishReason.LENGTH.value
