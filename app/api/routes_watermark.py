"""POST /watermark/detect: transformers' own WatermarkDetector on the served model's config.

Generation with `watermarking_config` runs transformers' WatermarkLogitsProcessor on the
model's device (app/engine/logits_processors.py); the detector builds the same processor
(vocab size from the model config, the same device), so its greenlists are the ones the
text was generated with and its numbers are exactly what `WatermarkDetector(...)(ids)`
returns. It is tensor math over token ids (no model forward): it runs in a worker thread,
not on the engine. Each sequence is scored alone, as the detector scores a batch of one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
from fastapi import APIRouter, Body, Depends
from starlette.concurrency import run_in_threadpool
from transformers.generation.watermarking import WatermarkDetector

from app.api.errors import APIError
from app.api.generation import encode
from app.api.routes_generate import ERRORS
from app.api.schemas_watermark import (
    DETECT_EXAMPLE,
    MAX_SEQUENCES,
    WatermarkDetectRequest,
    WatermarkDetectResponse,
    WatermarkingConfigModel,
)
from app.state import ServerState, get_state

router = APIRouter(tags=["watermark"])

EXAMPLES = {
    "text": {"summary": "Score a text", "value": DETECT_EXAMPLE},
    "ids": {
        "summary": "Score token ids (exact), default WatermarkingConfig",
        "value": {"input_ids": [[1843, 336, 2290, 1071, 345, 1690, 343, 812]]},
    },
}
OUTPUT_FIELDS = (
    "num_tokens_scored",
    "num_green_tokens",
    "green_fraction",
    "z_score",
    "p_value",
    "prediction",
    "confidence",
)


class DetectorCache:
    """A few detectors by (config, flag): building one draws a 1M-entry hashing table (about
    0.1 s on CPU). A detector reseeds its own generator for every n-gram, so each has a
    lock: two requests never interleave on one."""

    def __init__(self, max_size: int = 8) -> None:
        self._entries: OrderedDict[tuple[Any, ...], tuple[WatermarkDetector, threading.Lock]]
        self._entries = OrderedDict()
        self._lock = threading.Lock()
        self._max_size = max_size

    def get(
        self, model_config: Any, device: torch.device, cfg: dict[str, Any], ignore_repeats: bool
    ) -> tuple[WatermarkDetector, threading.Lock]:
        key = (id(model_config), str(device), tuple(sorted(cfg.items())), ignore_repeats)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        detector = WatermarkDetector(
            model_config=model_config,
            device=str(device),
            watermarking_config=cfg,
            ignore_repeated_ngrams=ignore_repeats,
        )
        with self._lock:
            entry = self._entries.setdefault(key, (detector, threading.Lock()))
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_size:
                self._entries.popitem(last=False)
        return entry


DETECTORS = DetectorCache()


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
    device = state.loaded.device
    cfg = body.watermarking_config.model_dump()
    detector, lock = DETECTORS.get(state.loaded.config, device, cfg, body.ignore_repeated_ngrams)
    out: dict[str, list[Any]] = {name: [] for name in OUTPUT_FIELDS}
    with lock:
        for ids in seqs:
            tensor = torch.tensor([ids], dtype=torch.long, device=device)
            result = detector(tensor, z_threshold=body.z_threshold, return_dict=True)
            for name in OUTPUT_FIELDS:
                out[name].append(getattr(result, name)[0].item())
    return out


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
