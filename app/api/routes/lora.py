"""vLLM's LoRA adapter routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(behind the API key like every route; errors in the /v1 JSON envelope, success in plain
text as vLLM answers it). The adapters themselves: app/engine/lora_registry.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from app.api.errors import APIError
from app.api.protocol.openai import (
    LoadLoRAAdapterRequest,
    OpenAIErrorResponse,
    UnloadLoRAAdapterRequest,
)
from app.engine.lora_registry import (
    LoRABaseError,
    LoRALimitError,
    LoRALoadError,
    LoRANameError,
    LoRANotFoundError,
)
from app.state import ServerState, get_state

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


# vLLM answers the adapter routes' success in plain text (errors: the /v1 JSON envelope).
_PLAIN_SUCCESS: dict[str, Any] = {
    "description": "Plain text: `Success: LoRA adapter '<name>' ... successfully.`",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}


def _lora_error(exc: Exception, field: str) -> APIError:
    if isinstance(exc, LoRANotFoundError):
        return APIError(404, str(exc), "not_found", field=field, code="model_not_found")
    return APIError(400, str(exc), "validation", field=field)


@router.post(
    "/load_lora_adapter",
    responses={
        200: _PLAIN_SUCCESS,
        **{code: {"model": OpenAIErrorResponse} for code in (400, 401, 422)},
    },
    summary="Load a LoRA adapter (vLLM)",
)
async def load_lora_adapter(
    body: LoadLoRAAdapterRequest, state: ServerState = Depends(get_state)
) -> PlainTextResponse:
    """Load a peft LoRA adapter under `lora_name`, for the default model or the served
    model `base_model_name` names (our extension; vLLM's --lora-modules JSON key); requests
    then select it by that name (`model`, TGI's `parameters.adapter_id`). 400: a path that
    is not a peft LoRA adapter, an adapter that does not fit its base model (shapes, rank),
    a name already loaded or a model's, an unknown base, or --max-loras adapters loaded."""
    registry = state.engine.engine.lora
    base = body.base_model_name
    if base is not None and base in state.models[0].names:
        base = None  # an alias of the default model
    try:  # reads and checks the files: off the event loop
        await run_in_threadpool(
            registry.load, body.lora_name, body.lora_path, base, body.load_inplace
        )
    except LoRALoadError as exc:
        raise _lora_error(exc, "lora_path") from exc
    except LoRABaseError as exc:
        raise _lora_error(exc, "base_model_name") from exc
    except (LoRANameError, LoRALimitError) as exc:
        raise _lora_error(exc, "lora_name") from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post(
    "/unload_lora_adapter",
    responses={
        200: _PLAIN_SUCCESS,
        **{code: {"model": OpenAIErrorResponse} for code in (400, 401, 404, 422)},
    },
    summary="Unload a LoRA adapter (vLLM)",
)
async def unload_lora_adapter(
    body: UnloadLoRAAdapterRequest, state: ServerState = Depends(get_state)
) -> PlainTextResponse:
    """Stop serving an adapter: new requests for it get a 404 (or the base model, without
    --strict-model-name, like any unknown name), while the requests already running with it
    finish with it. 404: no adapter of that name is loaded."""
    try:
        state.engine.engine.lora.unload(body.lora_name)
    except LoRANotFoundError as exc:
        raise _lora_error(exc, "lora_name") from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
