"""Few-shot prompting: POST /few-shot renders task + examples + query and generates the answer.

Every call with the same task and examples renders the same prompt prefix, so its full KV
blocks come from the prefix cache after the first call (kogpt_prefix_cache_hits_total).
Task, examples and query are contents: special-token text in them is encoded as ordinary
tokens (as chat messages are), only the template's prefixes and separators may be special.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from app.api.body_checks import OffLoopBodyRoute
from app.api.errors import APIError
from app.api.model_selection import select_adapter
from app.api.protocol.fewshot import (
    FEW_SHOT_EXAMPLE,
    FewShotRenderResponse,
    FewShotRequest,
    FewShotResponse,
    FewShotStreamEvent,
    FewShotTemplate,
)
from app.api.routes.generate import ERRORS, Prepared, build_response, context, tgi_events
from app.api.serving import (
    admit,
    build_params,
    check_prompt_ids,
    finish_name,
    run_to_completion,
)
from app.api.streaming import SSEResponse, guarded
from app.prompts.encoding import PlainTextError, PromptText, encode_prompt, from_parts
from app.state import ServerState, get_state

router = APIRouter(tags=["few-shot"], route_class=OffLoopBodyRoute)

DEFAULT_MAX_NEW_TOKENS = 64
EXAMPLES = {
    "few-shot": {"summary": "Sentiment, two examples", "value": FEW_SHOT_EXAMPLE},
    "zero-shot": {
        "summary": "Zero-shot (no examples)",
        "value": {
            "task": "다음 질문에 한 단어로 답하세요.",
            "query": "대한민국의 수도는?",
            "parameters": {"max_new_tokens": 8},
        },
    },
    "custom-template": {
        "summary": "Own template, streamed",
        "value": {
            "task": "한국어 문장을 존댓말로 바꾸세요.",
            "examples": [{"input": "밥 먹었어?", "output": "식사하셨어요?"}],
            "query": "어디 가?",
            "template": {"input_prefix": "반말: ", "output_prefix": "존댓말: "},
            "stream": True,
        },
    },
}


def render_parts(
    task: str, examples: list[Any], query: str, t: FewShotTemplate
) -> list[tuple[str, bool]]:
    """The prompt as (text, is_content) parts, before the trailing whitespace is removed."""
    blocks = [[(task.strip(), True)]] if task.strip() else []
    pairs = [(ex.input, ex.output) for ex in examples] + [(query, "")]  # the query's answer: ""
    for given, answer in pairs:
        blocks.append(
            [
                (t.input_prefix, False),
                (given, True),
                (t.input_output_separator, False),
                (t.output_prefix, False),
                (answer, True),
            ]
        )
    parts: list[tuple[str, bool]] = []
    for index, block in enumerate(blocks):
        if index:
            parts.append((t.example_separator, False))
        parts += block
    return parts


def prompt_ids(state: ServerState, body: FewShotRequest) -> tuple[list[int], str]:
    """The rendered prompt's ids and text (a 422 naming `prompt` when too long). Contents'
    special-token text is ordinary tokens unless --chat-allow-special-tokens."""
    prompt = from_parts(render_parts(body.task, body.examples, body.query, body.template))
    if state.settings.chat_allow_special_tokens:
        prompt = PromptText(prompt.text)  # no content spans: tokenized as a raw prompt is
    try:
        ids = encode_prompt(state.tokenizer, prompt)
    except PlainTextError as exc:
        raise APIError(422, f"`prompt`: {exc}", field="prompt") from exc
    check_prompt_ids(state, ids, "prompt")
    return ids, prompt.text


def default_stops(t: FewShotTemplate) -> list[str]:
    if not t.stop_at_separator:
        return []
    stops = [t.example_separator] if t.example_separator else []
    if t.input_prefix.strip():
        stops.append(t.input_prefix.strip())
    return stops


def stop_strings(options: dict[str, Any], t: FewShotTemplate) -> list[str]:
    """The request's own stop strings, then the template's."""
    given = options.get("stop_strings") or []
    given = [given] if isinstance(given, str) else list(given)
    return given + [s for s in default_stops(t) if s not in given]


def prepare(state: ServerState, body: FewShotRequest) -> Prepared:
    ids, prompt = prompt_ids(state, body)
    options, renames = body.parameters.generate_options()
    if "max_new_tokens" not in options and "max_length" not in options:
        options["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    if default_stops(body.template):
        options["stop_strings"] = stop_strings(options, body.template)
    target = select_adapter(state, body.parameters.adapter_id)
    params = build_params(state, options, len(ids), {"inputs": "prompt", **renames}, target=target)
    admit(state)
    return Prepared(ids, prompt, params, body.parameters)


@router.post(
    "/few-shot",
    response_model=FewShotResponse,
    responses={
        200: {
            "description": "JSON, or with `stream: true` server-sent events (TGI events; the "
            "last carries the stripped answer as generated_text, details, prompt and "
            "prompt_tokens).",
            "content": {
                "text/event-stream": {"schema": {"$ref": "#/components/schemas/FewShotStreamEvent"}}
            },
        },
        **ERRORS,
    },
    summary="Few-shot (or zero-shot) answer",
)
async def few_shot(
    request: Request,
    body: FewShotRequest = Body(openapi_examples=EXAMPLES),
    state: ServerState = Depends(get_state),
) -> Any:
    """Render `task`, `examples` and `query` with the template, generate, and stop at the
    example separator. Returns the answer, the rendered prompt and its token count."""
    prep = prepare(state, body)
    ctx = context(request, request.url.path, prep.prompt_text)
    if body.stream:
        extra = {"prompt": prep.prompt_text, "prompt_tokens": len(prep.prompt_ids)}
        events = tgi_events(state, ctx, prep, final_text=str.strip, final_extra=extra)
        return SSEResponse(events, cutoff=state.cutoff)
    completions = await guarded(
        request, run_to_completion(state, ctx, prep.prompt_ids, prep.params), state.cutoff
    )
    best = build_response(state, prep, completions)
    completion = max(completions, key=lambda c: c.cumulative_logprob)
    return FewShotResponse(
        answer=completion.text.strip(),
        prompt=prep.prompt_text,
        prompt_tokens=len(prep.prompt_ids),
        generated_tokens=len(completion.steps),
        finish_reason=finish_name(completion.finish_reason),
        num_examples=len(body.examples),
        details=best.details,
    )


@router.post(
    "/few-shot/render",
    response_model=FewShotRenderResponse,
    responses=ERRORS,
    summary="Render a few-shot prompt without generating",
)
async def few_shot_render(
    body: FewShotRequest = Body(openapi_examples=EXAMPLES),
    state: ServerState = Depends(get_state),
) -> FewShotRenderResponse:
    """The prompt, its token count and the stop strings that POST /few-shot would use for the
    same body (a prompt too long is the same 422). Nothing is generated: `stream` is ignored,
    and of `parameters` only the stop strings are used (the rest is not checked here)."""
    ids, prompt = prompt_ids(state, body)
    options, _ = body.parameters.generate_options()
    return FewShotRenderResponse(
        prompt=prompt, prompt_tokens=len(ids), stop_strings=stop_strings(options, body.template)
    )


__all__ = ["FewShotStreamEvent", "router"]
