"""What every completion route shares: prompts, options, admission, running and tracking a request.

`stream_request` is the one way the HTTP side talks to the engine: it maps engine errors to
APIErrors, records the request's metrics (TTFT, inter-token latency, token counts, finish
reason) and writes one structured log line per engine request (no text unless
--log-prompts). Closing it early (client gone, shutdown cut-off) aborts the engine request,
which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from app.api.errors import APIError, param_error
from app.api.middleware import note_request_model
from app.api.model_selection import Target, target_model
from app.engine.async_engine import EngineNotRunningError, EngineQueueFullError
from app.engine.core.request import FinishReason
from app.engine.lanes.exact import float_counts
from app.engine.outputs import GeneratedToken, PromptLogprob, RequestOutput, SequenceOutput
from app.options.checks import ParamValidationError
from app.options.params import SamplingParams
from app.options.resolve import ModelLimits, resolve_request
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


def build_params(
    state: ServerState,
    options: dict[str, Any],
    prompt_len: int,
    renames: dict[str, str] | None = None,
    *,
    exact_lane: bool = False,
    logprobs: bool = True,
    target: Target | None = None,
) -> SamplingParams:
    """The resolve step (app/options/resolve.py: routing by the option registry, defaults,
    ranges, cross-field and model-limit checks) for this server's model; a bad option is a
    422 named as the caller named it. `exact_lane`: the caller serves output_attentions /
    output_hidden_states (app/engine/lanes/exact.py); elsewhere they are a 422. `logprobs`:
    False when the response shows no token log-prob and none ranks the sequences (the
    engine then skips their full-row log-softmax). `target`: the model or adapter that runs
    the request (model_selection; None: the default model), whose generation_config gives
    the defaults, as its own `model.generate` would take them."""
    model = target_model(state, target)
    note_request_model(model.name)  # the HTTP metrics' model, whatever happens next
    config = model.config
    default_max_time = state.settings.default_max_time_seconds
    if default_max_time is not None and options.get("max_time") is None:
        options = {**options, "max_time": default_max_time}  # the server's own deadline
    limits = ModelLimits(
        generation_defaults=model.generation_defaults(),
        max_total_tokens=state.max_total_tokens,
        vocab_size=int(config.vocab_size),
        num_layers=int(config.n_layer),
        draft_model=state.settings.draft_model is not None,
        max_constraint_work=state.settings.max_constraint_work,
        max_contrastive_work=state.settings.max_contrastive_work,
        max_dola_work=state.settings.max_dola_work,
    )
    try:
        params = resolve_request(
            options,
            limits,
            prompt_len,
            encode=lambda text: encode(state, text),
            exact_lane=exact_lane,
        )
        check_prompt_sequences(state, params)
    except ParamValidationError as exc:
        raise param_error(exc, {"inputs": "inputs", **(renames or {})}) from exc
    # Several sequences: the routes rank them by summed log-probs (best_of, TGI order).
    params.logprobs = logprobs or params.num_return_sequences > 1
    if target is not None:
        params.model_name, params.lora_name = target.model, target.lora
    return params


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


def check_prompt_sequences(state: ServerState, params: SamplingParams) -> None:
    """One prompt's sequences against --max-request-sequences (every route; /v1/completions
    also prices all its prompts together), named by the option that asks for them."""
    cap = state.settings.max_request_sequences
    total = sequences_of(params)
    if total <= cap:
        return
    field = (
        "num_beams" if params.num_beams >= params.num_return_sequences else "num_return_sequences"
    )
    if params.num_beams == 1 and params.num_return_sequences == 1:
        field = "guidance_scale"
    raise ParamValidationError(
        field,
        f"`{field}` asks for {total} sequences (n / best_of / num_beams, + 1 with guidance), "
        f"at most {cap} per request (--max-request-sequences)",
    )


def check_request_sequences(state: ServerState, total: int) -> None:
    """One request's sequences (prompts x per-prompt sequences) against the setting."""
    cap = state.settings.max_request_sequences
    if total > cap:
        raise APIError(
            422,
            f"`prompt` asks for {total} sequences (prompts x n / best_of / num_beams); at most "
            f"{cap} per request (--max-request-sequences): send fewer prompts or sequences",
            field="prompt",
        )


def sequences_of(params: SamplingParams | None) -> int:
    """The sequences one prompt's request runs (echo-only prompts run none)."""
    if params is None:
        return 0
    guidance = 1 if params.guidance_scale is not None else 0
    return max(params.num_beams, params.num_return_sequences) + guidance


class RequestShare:
    """The sequences one HTTP request has in the engine; its engine requests enter in the
    order they asked (the first always), each woken only when it fits (no herd of a thousand
    waiters re-checking on every release)."""

    def __init__(self, shares: RequestShares) -> None:
        self.shares = shares
        self.in_engine = 0
        self.users = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._caps = (1, 1)  # (alone, contended) of the latest caller

    def _fits(self, sequences: int) -> bool:
        return not self.in_engine or self.in_engine + sequences <= self.shares.cap(*self._caps)

    async def acquire(self, sequences: int, alone: int, contended: int) -> None:
        self._caps = (alone, contended)
        if not self._waiters and self._fits(sequences):
            self.in_engine += sequences
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((sequences, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as it was cancelled
                self.release(sequences)
            raise

    def release(self, sequences: int) -> None:
        self.in_engine -= sequences
        while self._waiters:
            wanted, future = self._waiters[0]
            if future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._fits(wanted):
                return
            self._waiters.popleft()
            self.in_engine += wanted
            future.set_result(None)


class RequestShares:
    """Every HTTP request's share of the engine (--max-request-share). A /v1/completions
    request runs one engine request per prompt; without a share, 1,024 of them entered the
    engine's FCFS queue at once and a 4-token canary sent after them waited behind all of
    them (34 s, 190x its idle p99). While other HTTP requests are served (and for
    `HOLD_SECONDS` after the last of them ends, so a client's next request finds it so), one
    request has at most `contended` sequences in the engine and its other prompts wait their
    turn outside it; alone it may have twice that."""

    HOLD_SECONDS = 2.0

    def __init__(self) -> None:
        self.active: dict[str, RequestShare] = {}
        self._contended_until = float("-inf")

    def cap(self, alone: int, contended: int) -> int:
        now = time.monotonic()
        if len(self.active) > 1:
            self._contended_until = now + self.HOLD_SECONDS
        return contended if now < self._contended_until else alone


@asynccontextmanager
async def request_share(state: ServerState, request_id: str, sequences: int) -> AsyncIterator[None]:
    """Hold `sequences` of the HTTP request's share while its engine request runs."""
    if state.request_shares is None:
        state.request_shares = RequestShares()
    shares: RequestShares = state.request_shares
    share = shares.active.get(request_id)
    if share is None:
        share = shares.active[request_id] = RequestShare(shares)
    share.users += 1
    acquired = False
    try:
        settings = state.settings
        # alone: twice the share, so a newcomer finds little work ahead of it (more made the
        # first canary of tests/benchmarks/fairness.py wait, and the batch no faster on CPU)
        contended = settings.max_request_share
        await share.acquire(sequences, 2 * contended, contended)
        acquired = True
        yield
    finally:
        if acquired:
            share.release(sequences)
        share.users -= 1
        if share.users == 0:
            shares.active.pop(request_id, None)


def engine_error(out: RequestOutput, produced_tokens: bool) -> APIError:
    message = out.error or "unknown error"
    if out.error_kind == "invalid_request" and not produced_tokens:
        return APIError(422, message.split(": ", 1)[-1], "validation", out.error_field)
    return APIError(500, f"generation failed: {message}", "generation")


async def stream_request(
    state: ServerState,
    ctx: RequestContext,
    prompt_ids: list[int],
    params: SamplingParams,
    diagnostics: Sequence[str] = (),
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request (any lane), with metrics and a log line."""
    metrics = state.metrics
    # The metrics' model: the full model that runs it (an adapter's: its base).
    model = state.model_named(params.model_name).name
    note_request_model(model)
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
        share = request_share(state, ctx.request_id, max(sequences_of(params), 1))
        source = state.engine.generate(prompt_ids, params, diagnostics=tuple(diagnostics))
        async with share, aclosing(source) as outputs:
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
                        metrics.observe_first_token(ctx.endpoint, now - start, model=model)
                    else:
                        metrics.observe_inter_token(ctx.endpoint, now - last, per_seq, model=model)
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
            metrics.observe_finished(ctx.endpoint, reason, len(prompt_ids), generated, model=model)
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


def token_steps(seq: SequenceOutput) -> list[GeneratedToken]:
    """A sequence's delta token by token, each with the text the engine gave it."""
    return list(seq.tokens)


@dataclass
class Completion:
    """A finished sequence, accumulated from the engine's stream."""

    index: int = 0
    text: str = ""
    steps: list[GeneratedToken] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    score: float | None = None
    # The request's prompt log-probs (SamplingParams.prompt_logprobs), shared by its sequences.
    prompt_logprobs: list[PromptLogprob | None] | None = None

    @property
    def token_ids(self) -> list[int]:
        return [s.id for s in self.steps]

    @property
    def cumulative_logprob(self) -> float:
        if self.score is not None:
            return self.score
        return sum(s.logprob for s in self.steps if s.logprob is not None)

    def add(self, seq: SequenceOutput) -> list[GeneratedToken]:
        steps = token_steps(seq)
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
    completions, _ = await run_collecting(state, ctx, prompt_ids, params)
    return completions


async def run_collecting(
    state: ServerState,
    ctx: RequestContext,
    prompt_ids: list[int],
    params: SamplingParams,
    diagnostics: Sequence[str] = (),
) -> tuple[list[Completion], dict[str, list[Any]]]:
    """Run a request to its end: its completions and, for the exact lane, the diagnostic
    tensors it asked for (output_attentions / output_hidden_states) as nested lists."""
    completions = [Completion(i) for i in range(params.num_return_sequences)]
    found: dict[str, list[Any]] = {}
    prompt_logprobs = None
    source = stream_request(state, ctx, prompt_ids, params, diagnostics)
    async with aclosing(source) as outputs:
        async for out in outputs:
            for seq in out.outputs:
                while seq.index >= len(completions):
                    completions.append(Completion(len(completions)))
                completions[seq.index].add(seq)
            found.update(out.diagnostics or {})
            prompt_logprobs = prompt_logprobs or out.prompt_logprobs  # on the first output
    for completion in completions:
        completion.prompt_logprobs = prompt_logprobs
    return completions, found


def check_diagnostics_cap(
    state: ServerState, prompt_len: int, params: SamplingParams, asked: Sequence[str]
) -> None:
    """422 naming the field and the cap when the exact lane's outputs would exceed it."""
    cap = state.settings.exact_lane_max_floats
    counts = float_counts(state.model_named(params.model_name).config, prompt_len, params)
    total = sum(counts[name] for name in asked)
    if total > cap:
        name = max(asked, key=lambda n: counts[n])
        raise APIError(
            422,
            f"`{name}` would return up to {total} floats, over the cap of {cap} "
            "(--exact-lane-max-floats); ask for fewer new tokens or a shorter prompt",
            field=name,
        )


def finish_name(reason: FinishReason | None) -> str:
    """TGI's finish reason names (an unfinished sequence reports length)."""
    if reason in (FinishReason.EOS, FinishReason.STOP):
        return reason.value
    return FinishReason.LENGTH.value
