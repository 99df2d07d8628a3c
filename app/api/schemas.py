"""Request and response models (TGI wire format for now; more APIs join here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class GenerateParameters(BaseModel):
    """Generate options (the core set; names as in transformers' GenerationConfig / TGI).

    Omitted options take the checkpoint's generation_config defaults exactly as
    `model.generate` does (greedy, 20 new tokens, top_k 50 when sampling, ...).
    Unknown fields are rejected with 422 so a typo is never silently ignored.
    """

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(default=None, ge=1, description="New tokens to generate.")
    max_length: int | None = Field(default=None, ge=1, description="Prompt + new tokens.")
    min_new_tokens: int | None = Field(default=None, ge=0)
    min_length: int | None = Field(default=None, ge=0)
    do_sample: bool | None = Field(default=None, description="Sample instead of greedy/beam.")
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, description="0 disables top-k.")
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, description="Per-request seed (reproducible).")
    stop: list[str] | None = Field(default=None, description="Stop strings (TGI name).")
    stop_strings: list[str] | str | None = Field(
        default=None, description="Stop strings (HF name)."
    )
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    ignore_eos: bool | None = Field(default=None, description="Do not stop at eos.")
    details: bool = Field(default=False, description="Return per-token details.")
    return_full_text: bool = Field(default=False, description="Prepend the prompt to the text.")

    def generate_options(self) -> dict[str, Any]:
        """The options for resolve_sampling_params (API-only fields removed, aliases merged)."""
        data = self.model_dump(exclude={"details", "return_full_text", "stop"}, exclude_none=True)
        if self.stop:
            stops = data.get("stop_strings") or []
            data["stop_strings"] = [*([stops] if isinstance(stops, str) else stops), *self.stop]
        return data


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"inputs": "대한민국은", "parameters": {"max_new_tokens": 20}}]
        },
    )

    inputs: str = Field(description="The prompt text.")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


FinishReasonName = Literal["length", "eos_token", "stop_sequence"]


class Details(BaseModel):
    finish_reason: FinishReasonName
    generated_tokens: int
    seed: int | None = None
    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str
    field: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready", "starting", "draining", "unhealthy"]
