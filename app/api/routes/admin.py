"""Operational endpoints: /health, /ready, /info, /tokenize, /detokenize, /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from app.api.errors import APIError
from app.api.protocol.tgi import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    ReadyResponse,
    TokenInfo,
    TokenizeRequest,
    TokenizeResponse,
)
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
    response_model=TokenizeResponse,
    responses={**_AUTH_ERRORS, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Tokenize text",
)
async def tokenize(
    body: TokenizeRequest, state: ServerState = Depends(get_state)
) -> TokenizeResponse:
    """Token ids of `inputs` with each token's text and character span (as the server
    tokenizes prompts: no special tokens unless asked)."""
    enc = state.tokenizer(
        body.inputs, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True
    )
    tokens = [
        TokenInfo(id=t, text=body.inputs[a:b], start=a, stop=b)
        for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return TokenizeResponse(
        tokens=tokens, count=len(tokens), max_input_tokens=state.max_input_tokens
    )


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses={**_AUTH_ERRORS, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Decode token ids",
)
async def detokenize(
    body: DetokenizeRequest, state: ServerState = Depends(get_state)
) -> DetokenizeResponse:
    """Text of the token ids (special tokens skipped unless `skip_special_tokens` is false)."""
    vocab = len(state.tokenizer)
    bad = next((t for t in body.ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(422, f"`ids` has token id {bad}, outside [0, {vocab})", field="ids")
    text = state.tokenizer.decode(body.ids, skip_special_tokens=body.skip_special_tokens)
    return DetokenizeResponse(text=text)


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
