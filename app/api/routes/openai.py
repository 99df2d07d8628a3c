"""OpenAI-compatible routes: POST /v1/completions, GET /v1/models[/{model}].

The `openai` package works unchanged, streaming or not, `extra_body` options included.
Errors on /v1/* use OpenAI's envelope {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api.errors import APIError
from app.api.protocol.openai import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
    Usage,
)
from app.api.protocol.openai_options import (
    LogprobBuilder,
    completion_options,
    finish_reason,
    merge_logprobs,
    select,
)
from app.api.serving import (
    Completion,
    RequestContext,
    admit,
    build_params,
    check_diagnostics_cap,
    check_prompt_ids,
    check_request_sequences,
    encode,
    run_collecting,
    run_to_completion,
    sequences_of,
    stream_request,
    token_steps,
)
from app.api.streaming import DONE, SSEResponse, guarded, sse_event
from app.options.params import SamplingParams
from app.options.routing import exact_outputs
from app.state import ServerState, get_state

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

T = TypeVar("T")
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (401, 404, 413, 422, 429, 500, 503)
}
_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": OpenAIErrorResponse}}
EXAMPLES = {
    "greedy": {
        "summary": "Greedy completion",
        "value": {
            "model": "kogpt2-mini",
            "prompt": "대한민국은",
            "max_tokens": 32,
            "temperature": 0,
        },
    },
    "sampling": {
        "summary": "Two prompts, seeded sampling, a generate option as an extra field",
        "value": {
            "model": "kogpt2-mini",
            "prompt": ["모든 국민은", "국회는"],
            "max_tokens": 24,
            "temperature": 0.8,
            "seed": 42,
            "stop": ["."],
            "repetition_penalty": 1.2,
        },
    },
    "stream": {
        "summary": "Streaming with a usage chunk",
        "value": {
            "model": "kogpt2-mini",
            "prompt": "법률은",
            "max_tokens": 32,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    },
}


@dataclass
class Job:
    ids: list[int]
    text: str
    params: SamplingParams | None
    ctx: RequestContext


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"model `{model}` is not served here; this server serves `{state.model_name}`",
            "not_found",
            field="model",
        )


def prompt_list(state: ServerState, prompt: Any) -> list[tuple[list[int], str, str]]:
    """(ids, text, field) per prompt, validated; the count is priced before any encoding."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise APIError(422, "`prompt` is empty", field="prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    check_request_sequences(state, len(items))
    out = []
    for i, item in enumerate(items):
        field = "prompt" if len(items) == 1 else f"prompt.{i}"
        if isinstance(item, str):
            ids, text = encode(state, item), item
            check_prompt_ids(state, ids, field)
        else:
            ids = list(item)
            check_prompt_ids(state, ids, field)
            text = state.tokenizer.decode(ids)
        out.append((ids, text, field))
    return out


async def gather_all(coros: list[Any]) -> list[Any]:
    """Run the prompts' requests concurrently; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators; closing the result closes them all."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    finished = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream) as items:  # type: ignore[type-var]
                async for item in items:
                    await queue.put((i, item, None))
        except Exception as err:
            await queue.put((i, None, err))
        finally:
            queue.put_nowait((i, finished, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, err = await queue.get()
            if err is not None:
                raise err
            if item is finished:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


class Builder:
    """Response pieces shared by the streaming and non-streaming paths."""

    def __init__(self, state: ServerState, body: CompletionRequest, jobs: list[Job], n: int):
        self.state, self.body, self.jobs, self.n = state, body, jobs, n
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.echo = bool(body.echo)
        self.k = body.logprobs
        self.prompt_tokens = sum(len(j.ids) for j in jobs)

    def logprobs(self, job: Job) -> LogprobBuilder | None:
        return None if self.k is None else LogprobBuilder(self.state.tokenizer, self.k)

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )

    def response(self, results: list[list[Completion]]) -> CompletionResponse:
        choices = []
        generated = 0
        for i, (job, completions) in enumerate(zip(self.jobs, results, strict=True)):
            generated += sum(len(c.steps) for c in completions)
            for j, c in enumerate(select(completions, self.n)):
                lp_builder = self.logprobs(job)
                lp = None
                if lp_builder is not None:
                    lp = lp_builder.prompt(job.ids) if self.echo else None
                    lp = merge_logprobs(lp, lp_builder.steps(c.steps))
                text = (job.text if self.echo else "") + c.text
                reason = finish_reason(c.finish_reason) or "length"
                index = i * self.n + j
                choices.append(
                    CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=reason)
                )
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.state.model_name,
            choices=choices,
            usage=self.usage(generated),
        )

    def chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        return sse_event(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.state.model_name,
                "choices": choices,
                "usage": None if usage is None else usage.model_dump(),
            }
        )

    async def events(self) -> AsyncIterator[bytes]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        builders: dict[int, LogprobBuilder | None] = {}
        for i, job in enumerate(self.jobs):
            for j in range(self.n):
                index = i * self.n + j
                builders[index] = self.logprobs(job)
                if self.echo:
                    b = builders[index]
                    lp = None if b is None else b.prompt(job.ids).model_dump()
                    choice = {"index": index, "text": job.text, "logprobs": lp}
                    yield self.chunk([{**choice, "finish_reason": None}])
        live = [(i, job) for i, job in enumerate(self.jobs) if job.params is not None]
        streams = [stream_request(self.state, job.ctx, job.ids, job.params) for _, job in live]
        generated = 0
        done = 0
        async with aclosing(merged(streams)) as outputs:  # type: ignore[arg-type]
            async for k, out in outputs:
                i = live[k][0]
                done += int(out.finished)
                choices = []
                for seq in out.outputs:
                    index = i * self.n + seq.index
                    steps = token_steps(seq)
                    generated += len(steps)
                    b = builders.get(index)
                    lp = None if b is None else b.steps(steps).model_dump()
                    reason = finish_reason(seq.finish_reason)
                    choices.append(
                        {"index": index, "text": seq.text, "logprobs": lp, "finish_reason": reason}
                    )
                for j, choice in enumerate(choices):  # one choice per chunk, as OpenAI
                    last = done == len(live) and not include_usage and j == len(choices) - 1
                    yield self.chunk([choice], self.usage(generated) if last else None)
        if not live:  # max_tokens 0 with echo: nothing to generate
            total = len(self.jobs) * self.n
            for i in range(total):
                choice = {"index": i, "text": "", "logprobs": None, "finish_reason": "length"}
                last = i == total - 1 and not include_usage
                yield self.chunk([choice], self.usage(0) if last else None)
        if include_usage:
            yield self.chunk([], self.usage(generated))
        yield DONE


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={
        200: {
            "description": "JSON, or with `stream: true` server-sent events: one "
            "`data: <CompletionChunk>` per step, the finish_reason in each choice's last chunk, "
            "`usage` on the last chunk (or a separate chunk with stream_options.include_usage), "
            "then `data: [DONE]`.",
            "content": {
                "text/event-stream": {"schema": {"$ref": "#/components/schemas/CompletionChunk"}}
            },
        },
        **ERRORS,
    },
    summary="Create a completion (OpenAI)",
)
async def completions(
    request: Request,
    body: CompletionRequest = Body(openapi_examples=EXAMPLES),
    state: ServerState = Depends(get_state),
) -> Any:
    """OpenAI's legacy completions API. Any generate option may be added as an extra field
    (the `openai` package's `extra_body`)."""
    check_model(state, body.model)
    options, renames, n = completion_options(body)
    prompts = await run_in_threadpool(prompt_list, state, body.prompt)  # off the event loop
    exact = exact_outputs(options)  # output_attentions / output_hidden_states: exact lane
    if exact and len(prompts) > 1:
        raise APIError(422, f"`{exact[0]}` serves one prompt per request", field=exact[0])
    request_id = getattr(request.state, "request_id", "-")
    jobs = []
    for ids, text, field in prompts:
        params = None
        if options["max_new_tokens"] == 0:
            if not body.echo:
                message = "`max_tokens` must be >= 1 (0 only with echo)"
                raise APIError(422, message, "validation", "max_tokens")
        else:
            renames_here = {**renames, "inputs": field}
            params = build_params(
                state,
                options,
                len(ids),
                renames_here,
                exact_lane=not body.stream,
                logprobs=body.logprobs is not None,  # token_logprobs shown
            )
            if exact:
                check_diagnostics_cap(state, len(ids), params, exact)
        ctx = RequestContext(request.url.path, request_id, body.user, text)
        jobs.append(Job(ids, text, params, ctx))
    check_request_sequences(state, sum(sequences_of(j.params) for j in jobs))
    builder = Builder(state, body, jobs, n)
    if any(j.params is not None for j in jobs):
        admit(state)
    if body.stream:
        if (body.best_of or n) > n:
            raise APIError(422, "`best_of` > `n` cannot be streamed", field="best_of")
        return SSEResponse(builder.events(), cutoff=state.cutoff)
    job = jobs[0]
    if exact and job.params is not None:
        lane = run_collecting(state, job.ctx, job.ids, job.params, exact)
        completions, diagnostics = await guarded(request, lane, state.cutoff)
        response = builder.response([completions]).model_dump(mode="json")
        return JSONResponse({**response, "details": diagnostics})

    async def run(job: Job) -> list[Completion]:
        if job.params is None:
            return [Completion(j, finish_reason=None) for j in range(n)]
        return await run_to_completion(state, job.ctx, job.ids, job.params)

    results = await guarded(request, gather_all([run(j) for j in jobs]), state.cutoff)
    return builder.response(results)


def model_card(state: ServerState) -> ModelCard:
    return ModelCard(
        id=state.model_name, created=int(state.started_at), max_model_len=state.max_total_tokens
    )


@router.get("/models", response_model=ModelList, responses=_AUTH_ERRORS, summary="List models")
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    """The one served model (use its `id` as `model`)."""
    return ModelList(data=[model_card(state)])


@router.get(
    "/models/{model}",
    response_model=ModelCard,
    responses={**_AUTH_ERRORS, 404: {"model": OpenAIErrorResponse}},
    summary="Get a model",
)
async def get_model(model: str, state: ServerState = Depends(get_state)) -> ModelCard:
    """The served model's card (404 for any other name)."""
    check_model(state, model)
    return model_card(state)


__all__ = ["CompletionChunk", "router"]
