"""TGI-compatible text generation: POST /generate, POST /generate_stream and POST /.

Wire format as text-generation-inference: the `text-generation` client and
`huggingface_hub.InferenceClient(base_url).text_generation(...)` work unchanged (they post to
`/` with `stream`; a non-streaming `/` answers a one-element list, as TGI does). Where TGI and
`model.generate` differ these routes follow TGI (docs/api.md's table): a set warper turns
sampling on (`tgi_options`), a matched stop sequence stays in the text and `details.seed`
reports the seed used, chosen here when none was sent (`follow_tgi`).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from app.api.body_checks import OffLoopBodyRoute
from app.api.errors import APIError
from app.api.model_selection import select_adapter
from app.api.protocol.tgi import (
    BestOfSequence,
    Details,
    ErrorResponse,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    InputToken,
    StreamResponse,
    Token,
)
from app.api.serving import (
    Completion,
    RequestContext,
    admit,
    build_params,
    check_diagnostics_cap,
    check_prompt_ids,
    encode,
    finish_name,
    run_collecting,
    run_to_completion,
    stream_request,
    token_steps,
)
from app.api.streaming import SSEResponse, guarded, sse_event
from app.engine.outputs import GeneratedToken
from app.options.params import SamplingParams
from app.options.routing import exact_outputs
from app.state import ServerState, get_state

router = APIRouter(tags=["text-generation (TGI)"], route_class=OffLoopBodyRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 500, 503)
}
STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "model": StreamResponse,
        "description": "Server-sent events, one `data:` event per token; the last event "
        "carries `generated_text` and `details` (finish reason, token counts, seed). "
        "An error after the stream started is a final `data:` event in the error shape.",
    },
    # Errors found before the stream starts are JSON (without an explicit content, FastAPI
    # would document them in the route's text/event-stream media type).
    **{
        code: {
            "description": "Error (JSON).",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
            },
        }
        for code in ERRORS
    },
}

EXAMPLES = {
    "greedy": {
        "summary": "Greedy, 20 new tokens",
        "value": {"inputs": "대한민국은", "parameters": {"max_new_tokens": 20}},
    },
    "sampling": {
        "summary": "Seeded sampling with details",
        "value": {
            "inputs": "모든 국민은",
            "parameters": {
                "max_new_tokens": 30,
                "do_sample": True,
                "top_p": 0.92,
                "seed": 42,
                "details": True,
            },
        },
    },
    "stop": {
        "summary": "Stop strings and repetition penalty",
        "value": {
            "inputs": "국회는",
            "parameters": {"max_new_tokens": 40, "stop": ["."], "repetition_penalty": 1.2},
        },
    },
}


@dataclass
class Prepared:
    prompt_ids: list[int]
    prompt_text: str
    params: SamplingParams
    parameters: GenerateParameters
    exact: list[str] = field(default_factory=list)  # diagnostic outputs: the exact lane


def prepare(state: ServerState, body: GenerateRequest, stream: bool = False) -> Prepared:
    """Prompt and options of a TGI request, validated (422s are raised here, before any
    stream). output_attentions / output_hidden_states take the exact lane (not streamed)."""
    if body.input_ids is not None:
        prompt_ids, field = list(body.input_ids), "input_ids"
    else:
        prompt_ids, field = encode(state, body.inputs), "inputs"
    truncate = body.parameters.truncate
    if truncate is not None and len(prompt_ids) > truncate:
        prompt_ids = prompt_ids[-truncate:]
    check_prompt_ids(state, prompt_ids, field)
    options, renames = body.parameters.tgi_options()  # TGI: warpers turn sampling on
    renames = {"inputs": field, **renames}
    # Streams show every token's log-prob, details show them (ranking: build_params).
    wanted = stream or body.parameters.details
    target = select_adapter(state, body.parameters.adapter_id)
    params = build_params(
        state,
        options,
        len(prompt_ids),
        renames,
        exact_lane=not stream,
        logprobs=wanted,
        target=target,
    )
    follow_tgi(params)
    if body.parameters.details and body.parameters.decoder_input_details and not stream:
        params.prompt_logprobs = 0  # details.prefill: each prompt token's log-prob (TGI)
    exact = exact_outputs(options)
    if exact:
        check_diagnostics_cap(state, len(prompt_ids), params, exact)
    if body.input_ids is not None or truncate is not None:
        prompt_text = state.tokenizer.decode(prompt_ids)
    else:
        prompt_text = body.inputs
    admit(state)
    return Prepared(prompt_ids, prompt_text, params, body.parameters, exact)


def follow_tgi(params: SamplingParams) -> None:
    """TGI's output rules on top of the resolved options: the text keeps a matched stop
    sequence (TGI, and generate(stop_strings=)); unseeded sampling gets a server-chosen seed
    that is then used, so `details.seed` always reports a seed that replays the request."""
    params.include_stop_str_in_output = True
    if params.do_sample and params.seed is None:
        # 53 bits: a JSON number every client (JavaScript included) reads back exactly.
        params.seed = secrets.randbits(53)


def reported_seed(params: SamplingParams) -> int | None:
    """`details.seed`: the seed sampling used; null for greedy and beam search (TGI)."""
    return params.seed if params.do_sample else None


def context(request: Request, endpoint: str, prompt_text: str | None = None) -> RequestContext:
    request_id = getattr(request.state, "request_id", "-")
    return RequestContext(endpoint, request_id, prompt_text=prompt_text)


def special_ids(state: ServerState) -> set[int]:
    return set(state.tokenizer.all_special_ids)


def to_token(step: GeneratedToken, special: set[int]) -> Token:
    return Token(id=step.id, text=step.text, logprob=step.logprob, special=step.id in special)


def top_tokens(step: GeneratedToken, special: set[int], state: ServerState) -> list[Token]:
    return [
        Token(id=t, text=state.tokenizer.decode([t]), logprob=lp, special=t in special)
        for t, lp in step.top
    ]


def build_response(
    state: ServerState, prep: Prepared, completions: list[Completion]
) -> GenerateResponse:
    ranked = sorted(completions, key=lambda c: c.cumulative_logprob, reverse=True)
    best = ranked[0] if len(ranked) > 1 else completions[0]
    prefix = prep.prompt_text if prep.parameters.return_full_text else ""
    if not prep.parameters.details:
        return GenerateResponse(generated_text=prefix + best.text)
    special = special_ids(state)
    want_top = getattr(prep.params, "top_n_tokens", 0) > 0
    prefill = []
    if prep.parameters.decoder_input_details:  # TGI: the first token's logprob is null
        computed = best.prompt_logprobs
        if computed is None or len(computed) != len(prep.prompt_ids):  # token healing
            computed = [None] * len(prep.prompt_ids)
        prefill = [
            InputToken(
                id=t,
                text=state.tokenizer.decode([t]),
                logprob=None if entry is None else entry.logprob,
            )
            for t, entry in zip(prep.prompt_ids, computed, strict=True)
        ]

    def parts(c: Completion) -> dict[str, Any]:
        return {
            "finish_reason": finish_name(c.finish_reason),
            "generated_tokens": len(c.steps),
            "seed": reported_seed(prep.params),
            "prefill": prefill,
            "tokens": [to_token(s, special) for s in c.steps],
            "top_tokens": [top_tokens(s, special, state) for s in c.steps] if want_top else None,
        }

    others = None
    if len(ranked) > 1:
        others = [BestOfSequence(generated_text=prefix + c.text, **parts(c)) for c in ranked[1:]]
    details = Details(input_length=len(prep.prompt_ids), best_of_sequences=others, **parts(best))
    return GenerateResponse(generated_text=prefix + best.text, details=details)


async def generate_once(request: Request, state: ServerState, body: GenerateRequest) -> Any:
    endpoint = request.url.path
    prep = prepare(state, body)
    ctx = context(request, endpoint, prep.prompt_text)
    if prep.exact:
        run = run_collecting(state, ctx, prep.prompt_ids, prep.params, prep.exact)
        completions, diagnostics = await guarded(request, run, state.cutoff)
        response = build_response(state, prep, completions)
        assert response.details is not None  # the exact lane's options turn details on
        return response.model_copy(
            update={"details": response.details.model_copy(update=diagnostics)}
        )
    completions = await guarded(
        request, run_to_completion(state, ctx, prep.prompt_ids, prep.params), state.cutoff
    )
    return build_response(state, prep, completions)


async def tgi_events(
    state: ServerState,
    ctx: RequestContext,
    prep: Prepared,
    final_text: Callable[[str], str] | None = None,
    final_extra: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    """TGI stream events, each sent as soon as its token exists; the engine marks the step
    that finishes a sequence, so the token event of that step carries generated_text and
    details (TGI's last event)."""
    special = special_ids(state)
    want_top = getattr(prep.params, "top_n_tokens", 0) > 0
    pending: dict[str, Any] | None = None
    text = ""
    count = 0
    reason = None
    async with aclosing(stream_request(state, ctx, prep.prompt_ids, prep.params)) as outputs:
        async for out in outputs:
            for seq in out.outputs:
                if seq.index != 0:
                    continue
                for step in token_steps(seq):
                    if pending is not None:
                        yield sse_event(pending)
                    count += 1
                    text += step.text
                    pending = {
                        "index": count,
                        "token": to_token(step, special).model_dump(),
                        "top_tokens": [t.model_dump() for t in top_tokens(step, special, state)]
                        if want_top
                        else None,
                        "generated_text": None,
                        "details": None,
                    }
                if seq.finish_reason is not None:
                    reason = seq.finish_reason
            if reason is None and pending is not None:  # not the last token: send it now
                yield sse_event(pending)
                pending = None
    if pending is None:
        raise APIError(500, "generation ended without a token", "generation")
    prefix = prep.prompt_text if prep.parameters.return_full_text else ""
    pending["generated_text"] = final_text(text) if final_text else prefix + text
    pending["details"] = {
        "finish_reason": finish_name(reason),
        "generated_tokens": count,
        "input_length": len(prep.prompt_ids),
        "seed": reported_seed(prep.params),
    }
    pending.update(final_extra or {})
    yield sse_event(pending)


def stream_response(request: Request, state: ServerState, body: GenerateRequest) -> SSEResponse:
    prep = prepare(state, body, stream=True)
    if prep.params.num_return_sequences > 1:  # TGI streams one sequence
        field = "best_of" if (body.parameters.best_of or 1) > 1 else "num_return_sequences"
        raise APIError(422, f"`{field}` > 1 cannot be streamed; use POST /generate", field=field)
    ctx = context(request, request.url.path, prep.prompt_text)
    return SSEResponse(tgi_events(state, ctx, prep), cutoff=state.cutoff)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=ERRORS,
    summary="Generate text (TGI)",
)
async def generate(
    request: Request,
    body: GenerateRequest = Body(openapi_examples=EXAMPLES),
    state: ServerState = Depends(get_state),
) -> GenerateResponse:
    """Generate a continuation of `inputs`. Every `model.generate` option is a parameter."""
    if body.stream:
        raise APIError(422, "streaming is served by POST /generate_stream", field="stream")
    result: GenerateResponse = await generate_once(request, state, body)
    return result


@router.post(
    "/generate_stream",
    response_class=SSEResponse,
    status_code=200,
    responses=STREAM_DOC,
    summary="Generate text, streamed as server-sent events (TGI)",
)
async def generate_stream(
    request: Request,
    body: GenerateRequest = Body(openapi_examples=EXAMPLES),
    state: ServerState = Depends(get_state),
) -> SSEResponse:
    """Stream tokens as they are generated (UTF-8 safe: a token that ends inside a Korean
    syllable has empty text; the syllable arrives with the token that completes it)."""
    return stream_response(request, state, body)


@router.post(
    "/",
    response_model=list[GenerateResponse],
    responses={
        200: {
            "description": "`stream: false`: a one-element list (TGI). `stream: true`: the "
            "server-sent events of /generate_stream.",
            "content": {
                "text/event-stream": {"schema": {"$ref": "#/components/schemas/StreamResponse"}}
            },
        },
        **ERRORS,
    },
    summary="TGI compat route: streams when `stream` is true",
)
async def compat_generate(
    request: Request,
    body: GenerateRequest = Body(openapi_examples=EXAMPLES),
    state: ServerState = Depends(get_state),
) -> Any:
    """What TGI clients post to: `stream: false` answers `[GenerateResponse]`, `stream: true`
    the event stream of /generate_stream."""
    if body.stream:
        return stream_response(request, state, body)
    return [await generate_once(request, state, body)]
