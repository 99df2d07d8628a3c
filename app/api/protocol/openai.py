"""OpenAI-compatible models: /v1/completions and /v1/models.

Any field not listed here is collected (extra="allow") and validated as a generate option
(app/api/options.py), so `extra_body={"top_k": 20, "repetition_penalty": 1.2}` works and a
typo is a 422 that names it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.options.registry import option_range

# OpenAI fields that are generate options under another name take the option's bounds.
_TEMPERATURE, _TOP_P = option_range("temperature").bounds(), option_range("top_p").bounds()
_N, _BEST_OF = option_range("num_return_sequences").bounds(), option_range("best_of").bounds()
_LOGPROBS = option_range("top_n_tokens")

COMPLETION_EXAMPLES = [
    {"model": "kogpt2-mini", "prompt": "대한민국은", "max_tokens": 32, "temperature": 0},
    {
        "model": "kogpt2-mini",
        "prompt": ["모든 국민은", "국회는"],
        "max_tokens": 24,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 42,
        "stop": ["."],
        "top_k": 20,
    },
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(
        default=False, description="Send a last chunk with `usage` and no choices."
    )


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str | None = Field(default=None, description="The schema's name (not used).")
    description: str | None = Field(default=None, description="Not used.")
    schema_: dict[str, Any] | bool = Field(
        alias="schema", description="The JSON schema the output must match."
    )
    strict: bool | None = Field(default=None, description="Always enforced here.")


class ResponseFormat(BaseModel):
    """OpenAI's response_format, served as a grammar (docs/grammar.md)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"] = Field(
        description='"text": unconstrained; "json_object": any JSON object; "json_schema": '
        "the output matches `json_schema.schema`."
    )
    json_schema: JsonSchemaFormat | None = None


class OpenAIRequestFields(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share, with the same meaning."""

    model: str | None = Field(default=None, description="The served model name (GET /v1/models).")
    temperature: float | None = Field(
        default=1.0,
        allow_inf_nan=False,
        description="0 = greedy (do_sample false).",
        **_TEMPERATURE,
    )
    top_p: float | None = Field(default=1.0, description="Nucleus sampling mass.", **_TOP_P)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(
        default=0.0, ge=-2, le=2, description="Only 0 unless the engine serves it (422)."
    )
    frequency_penalty: float | None = Field(
        default=0.0, ge=-2, le=2, description="Only 0 unless the engine serves it (422)."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, description='{"token id": bias}; mapped to sequence_bias.'
    )
    seed: int | None = Field(default=None, description="Reproducible sampling.")
    user: str | None = Field(default=None, description="End-user id (logged, not used).")
    response_format: ResponseFormat | None = Field(
        default=None, description="JSON output: json_object or json_schema (a grammar)."
    )

    @property
    def extra_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CompletionRequest(OpenAIRequestFields):
    model_config = ConfigDict(
        extra="allow", strict=True, json_schema_extra={"examples": COMPLETION_EXAMPLES}
    )

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a list of texts, token ids, or a list of token id lists."
    )
    suffix: str | None = Field(default=None, description="Not supported (422 when set).")
    max_tokens: int | None = Field(
        default=16, ge=0, description="New tokens per choice (0 only with echo)."
    )
    n: int | None = Field(default=1, description="Choices per prompt.", **_N)
    best_of: int | None = Field(
        default=None,
        description="Sample this many per prompt, return the n most likely.",
        **_BEST_OF,
    )
    logprobs: int | None = Field(
        default=None,
        description=f"Return logprobs (and up to {_LOGPROBS.upper} alternatives).",
        **_LOGPROBS.bounds(),
    )
    echo: bool | None = Field(default=False, description="Prepend the prompt to the text.")
    stop: str | list[str] | None = Field(default=None, description="Stop strings (up to any).")


class LogProbs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LogProbs | None = None
    finish_reason: FinishReason | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "cmpl-3f9a",
                    "object": "text_completion",
                    "created": 1767225600,
                    "model": "kogpt2-mini",
                    "choices": [
                        {
                            "index": 0,
                            "text": " 민주공화국이다.",
                            "logprobs": None,
                            "finish_reason": "length",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19},
                }
            ]
        }
    )

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(CompletionResponse):
    """One SSE `data:` chunk; `data: [DONE]` ends the stream."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kogpt-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class OpenAIErrorResponse(BaseModel):
    """Error body of the /v1/* routes (same content as ErrorResponse, OpenAI's envelope)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "`max_tokens`: prompt length (3) + new tokens (5000) ...",
                        "type": "validation",
                        "param": "max_tokens",
                        "code": 422,
                    }
                }
            ]
        }
    )

    error: OpenAIErrorDetail
