"""OpenAI-compatible routes: POST /v1/completions, GET /v1/models[/{model}].

The `openai` package works unchanged, streaming or not, `extra_body` options included.
Errors on /v1/* use OpenAI's envelope {"error": {"message", "type", "param", "code"}}, request
errors as 400 invalid_request_error. With one model served any `model` name is this model
(TGI's behaviour) unless --strict-model-name.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api.body_checks import OffLoopBodyRoute
from app.api.errors import APIError
from app.api.model_selection import (
    check_model,
    default_eos_ids,
    model_names,
    select_model,
)
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
    apply_output_flags,
    apply_stop_token_ids,
    check_request_fields,
    completion_options,
    context_length_error,
    finish_reason,
    merge_logprobs,
    prompt_logprobs_wanted,
    prompt_only,
    select,
    truncate_prompt,
    vllm_prompt_logprobs,
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
from app.engine.outputs import PromptLogprob
from app.options.params import SamplingParams
from app.options.routing import exact_outputs
from app.state import ServerState, get_state

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], route_class=OffLoopBodyRoute)

T = TypeVar("T")
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
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
    prompt_only: bool = False  # max_tokens 0 with prompt log-probs: one engine run, n echoes

    @property
    def waits_for_prompt(self) -> bool:
        """Whether the echo needs the engine's prompt log-probs (sent with its first output)."""
        return self.params is not None and self.params.prompt_logprobs is not None


def check_prompt_fits(
    state: ServerState, ids: list[int], field: str, completion_tokens: int
) -> None:
    """An over-long prompt in OpenAI's words (the SDKs' and LiteLLM's context-window error);
    the other prompt checks (empty, token ids) as on every route."""
    if len(ids) > state.max_input_tokens:
        err = context_length_error(state.max_total_tokens, len(ids), completion_tokens, field)
        err.message = err.message.replace(
            " Please", f" A prompt may have at most {state.max_input_tokens} tokens. Please"
        )
        raise err
    check_prompt_ids(state, ids, field)


def check_context(
    state: ServerState, options: dict[str, Any], renames: dict[str, str], prompt_len: int
) -> None:
    """Prompt + new tokens past the model's context: OpenAI's wording, naming the field that
    set the new tokens (a max_length extra is left to the option checks)."""
    new_tokens = options.get("max_new_tokens")
    if not new_tokens or options.get("max_length") is not None:
        return
    if prompt_len + new_tokens > state.max_total_tokens:
        field = renames.get("max_new_tokens", "max_new_tokens")
        raise context_length_error(state.max_total_tokens, prompt_len, new_tokens, field)


def prompt_list(
    state: ServerState, body: CompletionRequest, completion_tokens: int
) -> list[tuple[list[int], str, str]]:
    """(ids, text, field) per prompt, validated; the count is priced before any encoding.
    truncate_prompt_tokens (vLLM) keeps each prompt's tail."""
    prompt: Any = body.prompt
    keep = body.truncate_prompt_tokens
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
        else:
            ids, text = list(item), None
        if keep is not None:
            kept = truncate_prompt(ids, keep, state.max_input_tokens)
            ids, text = kept, None if len(kept) < len(ids) else text
        check_prompt_fits(state, ids, field, completion_tokens)
        out.append((ids, state.tokenizer.decode(ids) if text is None else text, field))
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

    def __init__(
        self,
        state: ServerState,
        body: CompletionRequest,
        jobs: list[Job],
        n: int,
        model_name: str | None = None,
    ):
        self.state, self.body, self.jobs, self.n = state, body, jobs, n
        self.model_name = model_name or state.model_name  # an adapter's own, as vLLM
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.echo = bool(body.echo)
        self.k = body.logprobs
        self.token_ids = bool(body.return_token_ids)  # vLLM's return_token_ids
        self.prompt_tokens = sum(len(j.ids) for j in jobs)
        self.builders: dict[int, LogprobBuilder | None] = {}  # per streamed choice

    def logprobs(self, job: Job) -> LogprobBuilder | None:
        return None if self.k is None else LogprobBuilder(self.state.tokenizer, self.k)

    def vllm_prompt(self, computed: list[PromptLogprob | None] | None) -> dict[str, Any]:
        """vLLM's `prompt_logprobs` choice field, when the request asked for it."""
        k = self.body.prompt_logprobs
        if k is None or computed is None:
            return {}
        return {"prompt_logprobs": vllm_prompt_logprobs(self.state.tokenizer, computed, k)}

    def echo_choice(
        self, index: int, job: Job, computed: list[PromptLogprob | None] | None
    ) -> dict[str, Any]:
        """A choice's first stream chunk when it echoes the prompt or returns its ids."""
        b = self.builders[index]
        lp = None if b is None or not self.echo else b.prompt(job.ids, computed).model_dump()
        text = job.text if self.echo else ""
        choice = {"index": index, "text": text, "logprobs": lp}
        if self.token_ids:  # vLLM: the prompt's ids come in the first chunk
            choice["prompt_token_ids"] = job.ids
        extra = self.vllm_prompt(computed)
        if extra:
            choice["prompt_logprobs"] = [
                None if p is None else {t: e.model_dump() for t, e in p.items()}
                for p in extra["prompt_logprobs"]
            ]
        return {**choice, "finish_reason": None}

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
                    lp = lp_builder.prompt(job.ids, c.prompt_logprobs) if self.echo else None
                    lp = merge_logprobs(lp, lp_builder.steps(c.steps))
                text = (job.text if self.echo else "") + c.text
                reason = finish_reason(c.finish_reason) or "length"
                index = i * self.n + j
                ids = (
                    {"prompt_token_ids": job.ids, "token_ids": c.token_ids}
                    if self.token_ids
                    else {}
                )
                ids.update(self.vllm_prompt(c.prompt_logprobs))
                choices.append(
                    CompletionChoice(
                        index=index, text=text, logprobs=lp, finish_reason=reason, **ids
                    )
                )
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model_name,
            choices=choices,
            usage=self.usage(generated),
        )

    def chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        """One event; `usage` is null but on the include_usage chunk (as OpenAI sends it)."""
        return sse_event(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model_name,
                "choices": choices,
                "usage": None if usage is None else usage.model_dump(),
            }
        )

    async def events(self) -> AsyncIterator[bytes]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        first_chunk = self.echo or self.token_ids or self.body.prompt_logprobs is not None
        for i, job in enumerate(self.jobs):
            for j in range(self.n):
                index = i * self.n + j
                self.builders[index] = self.logprobs(job)
                if (self.echo or self.token_ids) and not job.waits_for_prompt:
                    yield self.chunk([self.echo_choice(index, job, None)])
        live = [(i, job) for i, job in enumerate(self.jobs) if job.params is not None]
        streams = [stream_request(self.state, job.ctx, job.ids, job.params) for _, job in live]
        generated = 0
        async with aclosing(merged(streams)) as outputs:  # type: ignore[arg-type]
            async for k, out in outputs:
                i, job = live[k]
                if first_chunk and job.waits_for_prompt and out.prompt_logprobs is not None:
                    for j in range(self.n):  # the echo, now with the prompt's log-probs
                        yield self.chunk(
                            [self.echo_choice(i * self.n + j, job, out.prompt_logprobs)]
                        )
                choices = []
                for seq in out.outputs:
                    steps = token_steps(seq)
                    generated += len(steps)
                    # a prompt-only run (max_tokens 0) ends all n choices at once
                    for j in range(self.n) if job.prompt_only else [seq.index]:
                        index = i * self.n + j
                        b = self.builders.get(index)
                        lp = None if b is None else b.steps(steps).model_dump()
                        reason = finish_reason(seq.finish_reason)
                        choice = {
                            "index": index, "text": seq.text, "logprobs": lp,
                            "finish_reason": reason,
                        }  # fmt: skip
                        if self.token_ids:
                            choice["token_ids"] = [step.id for step in steps]
                        choices.append(choice)
                for choice in choices:  # one choice per chunk, as OpenAI
                    yield self.chunk([choice])
        if not live:  # max_tokens 0 with echo: nothing to generate
            for i in range(len(self.jobs) * self.n):
                choice = {"index": i, "text": "", "logprobs": None, "finish_reason": "length"}
                yield self.chunk([choice])
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
            "with stream_options.include_usage a last chunk with `usage` and no choices, "
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
    target = select_model(state, body.model)
    check_request_fields(body, request.url.path)
    options, renames, n = completion_options(body)
    apply_stop_token_ids(options, renames, body.stop_token_ids, default_eos_ids(state, target))
    new_tokens = options["max_new_tokens"]
    prompts = await run_in_threadpool(prompt_list, state, body, new_tokens)  # off the loop
    exact = exact_outputs(options)  # output_attentions / output_hidden_states: exact lane
    if exact and len(prompts) > 1:
        raise APIError(422, f"`{exact[0]}` serves one prompt per request", field=exact[0])
    request_id = getattr(request.state, "request_id", "-")
    prompt_k = prompt_logprobs_wanted(body)

    def build_jobs() -> list[Job]:
        jobs = []
        for ids, text, field in prompts:
            params = None
            if options["max_new_tokens"] == 0:
                if not body.echo:
                    message = "`max_tokens` must be >= 1 (0 only with echo)"
                    raise APIError(422, message, "validation", "max_tokens")
                if prompt_k is not None:  # the prompt's log-probs: a prefill, nothing sampled
                    one = {**options, "max_new_tokens": 1, "num_return_sequences": 1}
                    params = build_params(
                        state, one, len(ids), {**renames, "inputs": field}, target=target
                    )
                    prompt_only(params, len(ids))
            else:
                renames_here = {**renames, "inputs": field}
                check_context(state, options, renames, len(ids))
                params = build_params(
                    state,
                    options,
                    len(ids),
                    renames_here,
                    exact_lane=not body.stream,
                    logprobs=body.logprobs is not None,  # token_logprobs shown
                    target=target,
                )
                apply_output_flags(params, body)
                if exact:
                    check_diagnostics_cap(state, len(ids), params, exact)
            if params is not None:
                params.prompt_logprobs = prompt_k
            ctx = RequestContext(request.url.path, request_id, body.user, text)
            jobs.append(Job(ids, text, params, ctx, prompt_only=options["max_new_tokens"] == 0))
        return jobs

    # Many prompts: their options are resolved off the event loop (0.14 ms each, 1,024 of
    # them held /health for 0.1 s and more), as their tokenization is.
    jobs = await run_in_threadpool(build_jobs) if len(prompts) > 8 else build_jobs()
    check_request_sequences(state, sum(sequences_of(j.params) for j in jobs))
    builder = Builder(state, body, jobs, n, target.name)
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
        completions = await run_to_completion(state, job.ctx, job.ids, job.params)
        if job.prompt_only:
            return [replace(completions[0], index=j) for j in range(n)]
        return completions

    results = await guarded(request, gather_all([run(j) for j in jobs]), state.cutoff)
    return builder.response(results)


def model_card(state: ServerState, name: str | None = None) -> ModelCard:
    """vLLM's card: an adapter's has its path as `root` and its base model as `parent`."""
    served = state.engine.engine.lora.served()
    created, max_len = int(state.started_at), state.max_total_tokens
    if name is not None and name in served:  # adapters never take a model's name
        base = state.models[served[name].base]
        root = served[name].adapter.path
        return ModelCard(
            id=name, created=created, max_model_len=max_len, root=root, parent=base.name
        )
    model = next((m for m in state.models if name in m.names), state.models[0])
    return ModelCard(id=name or model.name, created=created, max_model_len=max_len, root=model.path)


@router.get("/models", response_model=ModelList, responses=_AUTH_ERRORS, summary="List models")
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    """The default model, one card per --served-model-name alias (as vLLM lists them; the
    first is the name responses report), the other full models (--model NAME=PATH), then
    one card per LoRA adapter, with `parent` its base model's id (vLLM's shape)."""
    names = model_names(state)
    return ModelList(data=[model_card(state, name) for name in names])


@router.get(
    "/models/{model}",
    response_model=ModelCard,
    responses={**_AUTH_ERRORS, 404: {"model": OpenAIErrorResponse}},
    summary="Get a model",
)
async def get_model(model: str, state: ServerState = Depends(get_state)) -> ModelCard:
    """A served name's card; any other name is a 404 model_not_found (a lookup, not a request:
    the lenient `model` of the completion routes does not apply)."""
    check_model(state, model, strict=True)
    return model_card(state, model)


__all__ = ["CompletionChunk", "router"]
