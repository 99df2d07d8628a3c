"""POST /watermark/detect: transformers' own WatermarkDetector on the served model's config
(app/engine/watermark_detector.py), run in a worker thread; here the body's checks only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from starlette.concurrency import run_in_threadpool

from app.api.body_checks import OffLoopBodyRoute
from app.api.errors import APIError
from app.api.protocol.watermark import (
    DETECT_EXAMPLE,
    MAX_SEQUENCES,
    WatermarkDetectRequest,
    WatermarkDetectResponse,
    WatermarkingConfigModel,
)
from app.api.routes.generate import ERRORS
from app.api.serving import encode
from app.engine.watermark_detector import detect_watermark
from app.state import ServerState, get_state

router = APIRouter(tags=["watermark"], route_class=OffLoopBodyRoute)

EXAMPLES = {
    "text": {"summary": "Score a text", "value": DETECT_EXAMPLE},
    "ids": {
        "summary": "Score token ids (exact), default WatermarkingConfig",
        "value": {"input_ids": [[1843, 336, 2290, 1071, 345, 1690, 343, 812]]},
    },
}


def sequences(state: ServerState, body: WatermarkDetectRequest) -> tuple[list[list[int]], str]:
    """The token id sequences to score, and the request field they came from."""
    if (body.inputs is None) == (body.input_ids is None):
        raise APIError(422, "give exactly one of `inputs` and `input_ids`", field="inputs")
    if body.inputs is not None:
        field = "inputs"
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        seqs = [encode(state, text) for text in texts]
    else:
        field = "input_ids"
        ids: list[Any] = body.input_ids or []
        seqs = [list(s) for s in ids] if ids and isinstance(ids[0], list) else [list(ids)]
    if not seqs:
        raise APIError(422, f"`{field}` is empty", field=field)
    if len(seqs) > MAX_SEQUENCES:
        message = f"`{field}` has {len(seqs)} sequences; at most {MAX_SEQUENCES} per request"
        raise APIError(422, message, field=field)
    check_sequences(state, seqs, field, body.watermarking_config)
    return seqs, field


def check_sequences(
    state: ServerState, seqs: list[list[int]], field: str, cfg: WatermarkingConfigModel
) -> None:
    """Token ids in the vocabulary, at most n_positions per sequence, and enough tokens left
    after a leading bos (which the detector drops) to score one past the seeding context."""
    vocab = int(state.loaded.config.vocab_size)
    bos = state.loaded.config.bos_token_id
    for i, ids in enumerate(seqs):
        name = field if len(seqs) == 1 else f"{field}.{i}"
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(422, f"`{name}` has token id {bad}, outside [0, {vocab})", field=name)
        if len(ids) > state.n_positions:
            message = (
                f"`{name}` has {len(ids)} tokens; at most {state.n_positions} (the model's "
                "positions: no generation is longer)"
            )
            raise APIError(422, message, field=name)
        scored = len(ids) - int(bool(ids) and ids[0] == bos)
        if scored <= cfg.context_width:
            message = (
                f"`{name}` has {scored} token(s) to score; the detector needs at least "
                f"context_width + 1 = {cfg.context_width + 1} (a leading bos is not counted)"
            )
            raise APIError(422, message, field=name)


def detect(state: ServerState, body: WatermarkDetectRequest, seqs: list[list[int]]) -> Any:
    """WatermarkDetector over each sequence; the per-field lists of its outputs."""
    return detect_watermark(
        state.loaded.config,
        state.loaded.device,
        body.watermarking_config.model_dump(),
        body.ignore_repeated_ngrams,
        body.z_threshold,
        seqs,
    )


@router.post(
    "/watermark/detect",
    response_model=WatermarkDetectResponse,
    responses={code: spec for code, spec in ERRORS.items() if code not in (429, 503)},
    summary="Detect a watermark (transformers' WatermarkDetector)",
)
async def watermark_detect(
    body: WatermarkDetectRequest = Body(openapi_examples=EXAMPLES),
    state: ServerState = Depends(get_state),
) -> WatermarkDetectResponse:
    """Score text or token ids for the watermark that `watermarking_config` adds during
    generation. Give the same watermarking_config the text was generated with; the numbers
    are those of `transformers.WatermarkDetector` for the served model's config and device
    (one entry per sequence). Score the generated part only: the prompt dilutes the score."""
    seqs, _ = sequences(state, body)
    out = await run_in_threadpool(detect, state, body, seqs)
    out["num_tokens_scored"] = [int(x) for x in out["num_tokens_scored"]]
    out["num_green_tokens"] = [int(x) for x in out["num_green_tokens"]]
    return WatermarkDetectResponse(**out, z_threshold=body.z_threshold)
