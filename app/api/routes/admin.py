"""Operational endpoints: /health, /ready, /info, /tokenize, /detokenize, /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from app.api.errors import APIError
from app.api.protocol.tgi import (
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    ReadyResponse,
    TokenInfo,
)
from app.api.protocol.tokenize import (
    DetokenizeRequest,
    TokenizeRequest,
    VLLMDetokenizeResponse,
    VLLMTokenizeResponse,
)
from app.api.routes.chat import render_messages
from app.metrics import CONTENT_TYPE
from app.options.checks import ParamValidationError
from app.options.resolve import resolve_sampling_params
from app.state import ServerState, get_state, info_dict

router = APIRouter(tags=["operations"])

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API key missing or wrong."}
}


@router.get("/health", response_model=HealthResponse, summary="Process is alive")
async def health() -> HealthResponse:
    """Liveness: 200 as long as the process serves HTTP (also while starting or draining)."""
    return HealthResponse(status="ok")


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Starting, draining or broken."}},
    summary="Ready to serve generation requests",
)
async def ready(state: ServerState = Depends(get_state)) -> Any:
    """Readiness: 200 when the model is loaded and the engine runs; 503 while starting,
    while draining for shutdown (SIGTERM), or when the engine loop died."""
    if state.engine.error is not None:
        status = "unhealthy"
    elif state.engine.draining:
        status = "draining"
    elif not state.ready or not state.engine.is_running:
        status = "starting"
    else:
        return ReadyResponse(status="ready")
    return JSONResponse({"status": status}, status_code=503)


def max_best_of(state: ServerState) -> int:
    """How many sequences one request may ask for (1 until the engine serves n > 1)."""
    try:
        resolve_sampling_params(
            {"num_return_sequences": 2, "do_sample": True, "max_new_tokens": 1},
            {},
            state.max_total_tokens,
            1,
        )
    except ParamValidationError:
        return 1
    return state.settings.max_num_seqs


@router.get("/info", response_model=InfoResponse, responses=_AUTH_ERRORS, summary="Model info")
async def info(state: ServerState = Depends(get_state)) -> InfoResponse:
    """Model, dtype, device, limits and KV cache size (TGI's /info field names included)."""
    data = info_dict(state)
    settings = state.settings
    return InfoResponse(
        **data,
        model_dtype=data["dtype"],
        model_device_type=state.loaded.device.type
        if hasattr(state.loaded.device, "type")
        else str(state.loaded.device),
        max_input_length=state.max_input_tokens,
        max_best_of=max_best_of(state),
        max_concurrent_requests=settings.max_num_seqs + settings.max_waiting_requests,
    )


@router.post(
    "/tokenize",
    response_model=list[TokenInfo] | VLLMTokenizeResponse,
    responses={**_AUTH_ERRORS, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Tokenize text",
)
async def tokenize(
    body: TokenizeRequest, state: ServerState = Depends(get_state)
) -> list[TokenInfo] | VLLMTokenizeResponse:
    """TGI's `{"inputs"}`: TGI's answer, the list of the text's tokens with each one's id,
    text and character span (as the server tokenizes prompts: no special tokens unless
    asked). vLLM's `{"prompt"}` or
    `{"messages"}` (rendered as /v1/chat/completions does): vLLM's answer, the ids, their
    count and max_model_len."""
    if body.vllm:
        return vllm_tokenize(state, body)
    text = body.inputs or ""
    enc = state.tokenizer(
        text, add_special_tokens=bool(body.add_special_tokens), return_offsets_mapping=True
    )
    return [
        TokenInfo(id=t, text=text[a:b], start=a, stop=b)
        for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def vllm_tokenize(state: ServerState, body: TokenizeRequest) -> VLLMTokenizeResponse:
    """vLLM's /tokenize: `messages` rendered by the chat route's template (no length check:
    this is how a client measures a prompt)."""
    if body.messages is not None:
        ids, _ = render_messages(state, body.messages, bool(body.continue_final_message))
    else:
        add = body.add_special_tokens is not False  # vLLM's default: true
        ids = list(state.tokenizer(body.prompt or "", add_special_tokens=add)["input_ids"])
    strs = None
    if body.return_token_strs:
        strs = state.tokenizer.convert_ids_to_tokens(ids)
    return VLLMTokenizeResponse(
        count=len(ids), max_model_len=state.max_total_tokens, tokens=ids, token_strs=strs
    )


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse | VLLMDetokenizeResponse,
    responses={**_AUTH_ERRORS, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Decode token ids",
)
async def detokenize(
    body: DetokenizeRequest, state: ServerState = Depends(get_state)
) -> DetokenizeResponse | VLLMDetokenizeResponse:
    """Text of the token ids (special tokens skipped unless `skip_special_tokens` is false):
    `{"ids"}` -> `{"text"}`; vLLM's `{"tokens"}` -> `{"prompt"}`."""
    field = "ids" if body.ids is not None else "tokens"
    vocab = len(state.tokenizer)
    bad = next((t for t in body.token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(422, f"`{field}` has token id {bad}, outside [0, {vocab})", field=field)
    text = state.tokenizer.decode(body.token_ids, skip_special_tokens=body.skip_special_tokens)
    return DetokenizeResponse(text=text) if field == "ids" else VLLMDetokenizeResponse(prompt=text)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format."},
        **_AUTH_ERRORS,
    },
    summary="Prometheus metrics",
)
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    """Every metric is prefixed `kogpt_` and labelled with the model (see docs/api.md)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
