"""Which model serves a request: a full model (--model, several as NAME=PATH) or a LoRA
adapter (--lora-modules, /v1/load_lora_adapter), by the name a route was given.

/v1 routes take OpenAI's `model`; TGI routes and /few-shot take TGI's `parameters.adapter_id`.
With one full model, any `model` that names nothing served means that model (TGI's
behaviour, what InferenceClient and LangChain's ChatHuggingFace rely on) unless
--strict-model-name; with several, a name must be served (404 listing the served ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.api.errors import APIError
from app.state import ServedModel, ServerState


@dataclass(frozen=True)
class Target:
    """What a request runs on: `model` the full model's engine name (None: the default;
    for an adapter, the adapter's base), `lora` an adapter's name, `name` the name the
    response reports (the adapter's, as vLLM, else the model's)."""

    model: str | None
    lora: str | None
    name: str


def served_names(state: ServerState) -> list[str]:
    """The default model's names (--served-model-name aliases); the first is reported."""
    return list(state.models[0].names)


def adapter_names(state: ServerState) -> list[str]:
    """The LoRA adapters served now (--lora-modules, /v1/load_lora_adapter)."""
    return state.engine.engine.lora.names()


def model_names(state: ServerState) -> list[str]:
    """Every name a request may select: the default's aliases, the other full models,
    the adapters."""
    return [*served_names(state), *(m.name for m in state.models[1:]), *adapter_names(state)]


def default_target(state: ServerState) -> Target:
    return Target(None, None, state.model_name)


def _lookup(state: ServerState, name: str) -> Target | None:
    if name in served_names(state):
        return default_target(state)
    for model in state.models[1:]:
        if name in model.names:
            return Target(model.engine_name, None, model.name)
    served = state.engine.engine.lora.served().get(name)
    if served is not None:
        return Target(state.models[served.base].engine_name, name, name)
    return None


def served_list(state: ServerState) -> str:
    """The served names for an error message: each model's reported name, each adapter."""
    names = [m.name for m in state.models] + adapter_names(state)
    return ", ".join(f"`{n}`" for n in names)


def lenient(state: ServerState, strict: bool | None) -> bool:
    """Whether a name that is not served means the default model."""
    strict = state.settings.strict_model_name if strict is None else strict
    return not strict and len(state.models) == 1


def select_model(state: ServerState, model: str | None, strict: bool | None = None) -> Target:
    """OpenAI's `model` (None: the default model)."""
    if model is None:
        return default_target(state)
    target = _lookup(state, model)
    if target is not None:
        return target
    if lenient(state, strict):
        return default_target(state)
    raise APIError(
        404,
        f"The model `{model}` does not exist: this server serves {served_list(state)}",
        "not_found",
        field="model",
        code="model_not_found",
    )


def check_model(state: ServerState, model: str | None, strict: bool | None = None) -> None:
    """`model` names something served (or may mean the default model: select_model)."""
    select_model(state, model, strict)


def select_adapter(state: ServerState, adapter_id: str | None) -> Target:
    """TGI's `parameters.adapter_id`: a served model's or adapter's name (null or the
    default model's name: the default); any other name is a 404 listing the served ones."""
    if adapter_id is None:
        return default_target(state)
    target = _lookup(state, adapter_id)
    if target is None:
        raise APIError(
            404,
            f"no model or LoRA adapter named `{adapter_id}` is served: this server serves "
            f"{served_list(state)}",
            "not_found",
            field="adapter_id",
        )
    return target


def target_model(state: ServerState, target: Target | None) -> ServedModel:
    """The full model a target runs on (an adapter's: its base)."""
    return state.model_named(None if target is None else target.model)


def default_eos_ids(state: ServerState, target: Target | None = None) -> list[int]:
    """The model's eos ids, as generate takes them (generation_config, else the
    tokenizer's)."""
    eos = target_model(state, target).generation_defaults().get("eos_token_id")
    if eos is None:
        eos = state.tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
