"""Operational endpoints: /health (process alive), /ready (engine serving), /info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from app.api.schemas import HealthResponse, ReadyResponse
from app.state import ServerState, get_state, info_dict

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def ready(state: ServerState = Depends(get_state)) -> Any:
    if state.engine.error is not None:
        status = "unhealthy"
    elif state.engine.draining:
        status = "draining"
    elif not state.ready or not state.engine.is_running:
        status = "starting"
    else:
        return ReadyResponse(status="ready")
    return JSONResponse({"status": status}, status_code=503)


@router.get("/info")
async def info(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    return info_dict(state)
