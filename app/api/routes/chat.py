"""OpenAI chat completions for KoGPT-2 chatbot fine-tunes: POST /v1/chat/completions.

The messages are rendered by the chat template (app/prompts/chat_template.py) into one prompt;
the OpenAI sampling fields map to generate options through the /v1/completions mapping
(openai_mapping.completion_options, so both routes treat temperature, top_p, n, stop, seed,
logit_bias, penalties and extra generate options the same). Chat adds: generation stops at
eos (`</s>`) and at `<usr>` (the model opening the next user turn), unless the request sets
`eos_token_id` or `ignore_eos`; max tokens default to the rest of the context, as OpenAI's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import lru_cache
from typing import Any

import jinja2
from fastapi import APIRouter, Body, Depends, Request

from app.api.body_checks import OffLoopBodyRoute
from app.api.errors import APIError
from app.api.model_selection import Target, default_eos_ids, select_model
from app.api.protocol.chat import (
    CHAT_EXAMPLE,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
)
from app.api.protocol.openai import CompletionRequest, PromptLogprobs, Usage
from app.api.protocol.openai_options import (
    apply_output_flags,
    apply_stop_token_ids,
    check_request_fields,
    completion_options,
    finish_reason,
    truncate_prompt,
    vllm_prompt_logprobs,
)
from app.api.routes.openai import (
    ERRORS,
    check_context,
    check_prompt_fits,
)
from app.api.serving import (
    Completion,
    RequestContext,
    admit,
    build_params,
    run_to_completion,
    stream_request,
    token_steps,
)
from app.api.streaming import DONE, SSEResponse, guarded, sse_event
from app.engine.outputs import GeneratedToken
from app.engine.stop import token_bytes_table
from app.options.params import SamplingParams
from app.prompts.chat_template import render_chat_prompt, resolve_template, turn_stop_token_ids
from app.prompts.encoding import PlainTextError, encode_prompt
from app.state import ServerState, get_state

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], route_class=OffLoopBodyRoute)

# Legacy-completions fields that chat does not have: as extra fields they are unknown, not
# options. Other CompletionRequest fields sent as extras (e.g. response_format, where served)
# pass through the shared mapping. (`echo` is a chat field too: vLLM's, below.)
COMPLETION_ONLY = frozenset({"prompt", "suffix", "best_of"})
EXAMPLES = {
    "chat": {"summary": "A conversation with a system message", "value": CHAT_EXAMPLE},
    "stream": {
        "summary": "Streamed, two choices, usage chunk, a generate option as an extra field",
        "value": {
            "messages": [{"role": "user", "content": "오늘 기분이 어때?"}],
            "max_tokens": 24,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "repetition_penalty": 1.2,
        },
    },
}


def render_messages(
    state: ServerState, messages: list[ChatMessage], continue_final: bool = False
) -> tuple[list[int], str]:
    """The chat template's prompt for the messages: its token ids and text (a 422 naming
    `messages` when the template rejects them). Special-token text in the contents is
    encoded as ordinary tokens unless --chat-allow-special-tokens. `continue_final`
    (vLLM's continue_final_message): the prompt ends inside the last message."""
    conversation = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]
    template = resolve_template(state.settings.chat_template, state.tokenizer)
    allow = state.settings.chat_allow_special_tokens
    try:
        prompt = render_chat_prompt(state.tokenizer, conversation, template, allow, continue_final)
        ids = encode_prompt(state.tokenizer, prompt)
    except jinja2.TemplateError as exc:
        message = f"`messages`: the chat template ({template.source}) rejected them: {exc}"
        raise APIError(422, message, field="messages") from exc
    except PlainTextError as exc:
        raise APIError(422, f"`messages`: {exc}", field="messages") from exc
    except ValueError as exc:  # apply_chat_template's continue_final_message checks
        if not continue_final:
            raise
        message = f"`continue_final_message`: the last message cannot be continued: {exc}"
        raise APIError(422, message, field="continue_final_message") from exc
    return ids, prompt.text


def chat_prompt(
    state: ServerState, messages: list[ChatMessage], body: ChatCompletionRequest | None = None
) -> tuple[list[int], str]:
    """The rendered prompt's token ids and text, checked (a 400 naming `messages` when the
    prompt is too long, in OpenAI's words). `body`'s continue_final_message and
    truncate_prompt_tokens (vLLM) apply."""
    continue_final = bool(body and body.continue_final_message)
    ids, text = render_messages(state, messages, continue_final)
    if body is not None and body.truncate_prompt_tokens is not None:
        kept = truncate_prompt(ids, body.truncate_prompt_tokens, state.max_input_tokens)
        ids, text = kept, text if len(kept) == len(ids) else state.tokenizer.decode(kept)
    given = None if body is None else body.max_completion_tokens or body.max_tokens
    check_prompt_fits(state, ids, "messages", given or 0)
    return ids, text


def stop_token_ids(state: ServerState, target: Target | None = None) -> list[int]:
    """The checkpoint's eos (as generate takes it) plus the `<usr>` turn marker."""
    ids = default_eos_ids(state, target)
    return ids + [t for t in turn_stop_token_ids(state.tokenizer) if t not in ids]


def chat_options(
    state: ServerState, body: ChatCompletionRequest, ids: list[int], target: Target | None = None
) -> tuple[dict[str, Any], dict[str, str], int]:
    """(generate options, error renames, n), through the /v1/completions mapping."""
    extras = body.extra_options
    clash = sorted(set(extras) & COMPLETION_ONLY)
    if clash:
        message = f"unknown field `{clash[0]}` (not a chat completions field nor a generate option)"
        raise APIError(422, message, field=clash[0])
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(422, "`top_logprobs` needs `logprobs: true`", field="top_logprobs")
    limits = {"max_completion_tokens": body.max_completion_tokens, "max_tokens": body.max_tokens}
    given = {name: value for name, value in limits.items() if value is not None}
    if len(set(given.values())) > 1:
        message = "`max_completion_tokens` and `max_tokens` differ; give one of them"
        raise APIError(422, message, field="max_completion_tokens")
    max_field = next(iter(given), "max_completion_tokens")
    max_tokens = next(iter(given.values()), state.max_total_tokens - len(ids))
    fields = {
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "n": body.n,
        "stop": body.stop,
        "seed": body.seed,
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "logit_bias": body.logit_bias,
        "user": body.user,
        "response_format": body.response_format,
        "min_tokens": body.min_tokens,
        "ignore_eos": body.ignore_eos,
    }
    options, renames, n = completion_options(CompletionRequest.model_validate({**extras, **fields}))
    renames.update(max_new_tokens=max_field, top_n_tokens="top_logprobs", inputs="messages")
    if body.stop_token_ids:  # added to the chat's stop ids (eos + <usr>, unless ignore_eos)
        apply_stop_token_ids(options, renames, body.stop_token_ids, stop_token_ids(state, target))
    elif "eos_token_id" not in extras and not body.ignore_eos:
        options["eos_token_id"] = stop_token_ids(state, target)
    if given:
        check_context(state, options, renames, len(ids))
    return options, renames, n


@lru_cache(maxsize=4)
def token_bytes(tokenizer: Any) -> list[bytes]:
    """Every token's UTF-8 bytes (a Hangul syllable split over tokens keeps its real bytes)."""
    return token_bytes_table(tokenizer)


class ChatBuilder:
    """Response pieces shared by the streaming and non-streaming paths."""

    def __init__(
        self,
        state: ServerState,
        body: ChatCompletionRequest,
        ids: list[int],
        n: int,
        model_name: str | None = None,
    ):
        self.state, self.body, self.prompt_tokens, self.n = state, body, len(ids), n
        self.model_name = model_name or state.model_name  # an adapter's own, as vLLM
        self.prompt_ids = ids
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.k: int | None = (body.top_logprobs or 0) if body.logprobs else None
        # vLLM's chat echo: a last assistant message (the one continue_final_message
        # continues) is repeated before the answer.
        last = body.messages[-1]
        self.echo = last.text() if body.echo and last.role == "assistant" else ""

    def usage(self, completion_tokens: int) -> Usage:
        total = self.prompt_tokens + completion_tokens
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=total,
        )

    def _token(self, token: int, logprob: float | None) -> dict[str, Any]:
        table = token_bytes(self.state.tokenizer)
        raw = table[token] if token < len(table) else b""
        text = self.state.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def logprobs(self, steps: list[GeneratedToken]) -> dict[str, Any] | None:
        if self.k is None:
            return None
        content = []
        for step in steps:
            top = [self._token(token, logprob) for token, logprob in step.top[: self.k]]
            content.append({**self._token(step.id, step.logprob), "top_logprobs": top})
        return {"content": content, "refusal": None}

    def response(self, completions: list[Completion]) -> ChatCompletionResponse:
        token_ids = bool(self.body.return_token_ids)  # vLLM's return_token_ids
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": self.echo + c.text},
                "logprobs": self.logprobs(c.steps),
                "finish_reason": finish_reason(c.finish_reason) or "length",
                "token_ids": c.token_ids if token_ids else None,
            }
            for c in completions
        ]
        return ChatCompletionResponse.model_validate(
            {
                "id": self.id,
                "created": self.created,
                "model": self.model_name,
                "choices": choices,
                "usage": self.usage(sum(len(c.steps) for c in completions)),
                "prompt_token_ids": self.prompt_ids if token_ids else None,
                "prompt_logprobs": self.prompt_logprobs(completions),
            }
        )

    def prompt_logprobs(self, completions: list[Completion]) -> PromptLogprobs | None:
        k = self.body.prompt_logprobs
        computed = completions[0].prompt_logprobs if completions else None
        if k is None or computed is None:
            return None
        return vllm_prompt_logprobs(self.state.tokenizer, computed, k)

    def chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        return sse_event(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model_name,
                "system_fingerprint": None,
                "choices": choices,
                "usage": None if usage is None else usage.model_dump(),
            }
        )

    def choice(self, index: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, **extra}

    async def events(
        self, ctx: RequestContext, ids: list[int], params: SamplingParams
    ) -> AsyncIterator[bytes]:
        """Per choice: a role delta, content deltas (one choice per chunk), a finish chunk."""
        for index in range(self.n):
            yield self.chunk([self.choice(index, {"role": "assistant", "content": ""})])
            if self.echo:
                yield self.chunk([self.choice(index, {"content": self.echo})])
        generated = 0
        finished: set[int] = set()
        async with aclosing(stream_request(self.state, ctx, ids, params)) as outputs:
            async for out in outputs:
                for seq in out.outputs:
                    steps = token_steps(seq)
                    generated += len(steps)
                    if seq.text or (steps and (self.k is not None or self.body.return_token_ids)):
                        lp = self.logprobs(steps)
                        extra = {"logprobs": lp}
                        if self.body.return_token_ids:
                            extra["token_ids"] = [step.id for step in steps]
                        yield self.chunk([self.choice(seq.index, {"content": seq.text}, **extra)])
                    if seq.finish_reason is not None and seq.index not in finished:
                        finished.add(seq.index)
                        reason = finish_reason(seq.finish_reason) or "length"
                        yield self.chunk([self.choice(seq.index, {}, finish_reason=reason)])
        for index in sorted(set(range(self.n)) - finished):  # as the JSON path: length
            yield self.chunk([self.choice(index, {}, finish_reason="length")])
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield self.chunk([], self.usage(generated))
        yield DONE


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        200: {
            "description": "JSON, or with `stream: true` server-sent events: "
            "`data: <ChatCompletionChunk>` (per choice a role delta, content deltas, then an "
            "empty delta with finish_reason; with stream_options.include_usage a last chunk "
            "with `usage` and no choices), then `data: [DONE]`.",
            "content": {
                "text/event-stream": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}
                }
            },
        },
        **ERRORS,
    },
    summary="Create a chat completion (OpenAI)",
)
async def chat_completions(
    request: Request,
    body: ChatCompletionRequest = Body(openapi_examples=EXAMPLES),
    state: ServerState = Depends(get_state),
) -> Any:
    """OpenAI's chat completions API for KoGPT-2 chatbot fine-tunes: the messages are rendered
    by the chat template (`<usr>{question}<sys>{answer}</s>` turns unless configured) and the
    answer ends at `</s>` or at the next `<usr>`. Any generate option may be added as an extra
    field (the `openai` package's `extra_body`)."""
    target = select_model(state, body.model)
    check_request_fields(body, request.url.path)
    ids, text = chat_prompt(state, body.messages, body)
    options, renames, n = chat_options(state, body, ids, target)
    params = build_params(
        state, options, len(ids), renames, logprobs=bool(body.logprobs), target=target
    )
    apply_output_flags(params, body)
    if body.stream and body.prompt_logprobs:  # vLLM's rule: no place for them in the chunks
        raise APIError(
            400, "`prompt_logprobs` are not available when `stream=True`.", field="prompt_logprobs"
        )
    if not body.stream:  # vLLM's prompt_logprobs, in the JSON answer
        params.prompt_logprobs = body.prompt_logprobs
    request_id = getattr(request.state, "request_id", "-")
    ctx = RequestContext(request.url.path, request_id, body.user, text)
    builder = ChatBuilder(state, body, ids, n, target.name)
    admit(state)
    if body.stream:
        return SSEResponse(builder.events(ctx, ids, params), cutoff=state.cutoff)
    completions = await guarded(request, run_to_completion(state, ctx, ids, params), state.cutoff)
    return builder.response(completions)
