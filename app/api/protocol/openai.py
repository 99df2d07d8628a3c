"""OpenAI-compatible models: /v1/completions and /v1/models.

Any field not listed here is collected (extra="allow") and validated as a generate option
(app/api/options.py), so `extra_body={"top_k": 20, "repetition_penalty": 1.2}` works and a
typo is a 400 that names it and the closest known field.

Listed beside OpenAI's own fields: what vLLM and sglang-router send (min_tokens,
stop_token_ids, ignore_eos, ...; mapped in openai_options.py) and OpenAI fields with no meaning
for this server (tools, metadata, store, ...: accepted, logged at debug level, ignored).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.options.registry import OPTIONS, option_range

# OpenAI fields that are generate options under another name take the option's bounds.
_TEMPERATURE, _TOP_P = option_range("temperature").bounds(), option_range("top_p").bounds()
_N, _BEST_OF = option_range("num_return_sequences").bounds(), option_range("best_of").bounds()
_LOGPROBS = option_range("top_n_tokens")
_NEW_TOKENS = option_range("max_new_tokens").bounds()
_MIN_NEW_TOKENS = option_range("min_new_tokens").bounds()
_IGNORED = "Accepted and ignored (no meaning for this server)."
PROMPT_LOGPROBS_MAX = 20  # vLLM's default max_logprobs

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
    """OpenAI's response_format, or TGI's (its grammar object), served as a grammar
    (docs/grammar.md)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema", "json", "regex"] = Field(
        description='"text": unconstrained; "json_object": any JSON object (TGI: the JSON '
        'schema in `value`); "json_schema": the output matches `json_schema.schema` (TGI: '
        '`value.schema`); TGI\'s "json" (schema in `value`) and "regex" (`value`).'
    )
    json_schema: JsonSchemaFormat | None = None
    value: str | dict[str, Any] | None = Field(
        default=None, description="TGI's form: the JSON schema or the regex."
    )


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
        default=0.0,
        allow_inf_nan=False,
        description=OPTIONS["presence_penalty"].description,
        **option_range("presence_penalty").bounds(),
    )
    frequency_penalty: float | None = Field(
        default=0.0,
        allow_inf_nan=False,
        description=OPTIONS["frequency_penalty"].description,
        **option_range("frequency_penalty").bounds(),
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, description='{"token id": bias}; mapped to sequence_bias.'
    )
    seed: int | None = Field(default=None, description="Reproducible sampling.")
    user: str | None = Field(default=None, description="End-user id (logged, not used).")
    response_format: ResponseFormat | None = Field(
        default=None, description="JSON output: json_object or json_schema (a grammar)."
    )
    # vLLM's and sglang's sampling extensions (their names and meaning).
    min_tokens: int | None = Field(
        default=None, description="vLLM: eos and stop_token_ids are masked until this many "
        "new tokens (min_new_tokens).", **_MIN_NEW_TOKENS,
    )  # fmt: skip
    stop_token_ids: list[int] | None = Field(
        default=None, description="vLLM: token ids that also end generation (added to eos)."
    )
    ignore_eos: bool | None = Field(
        default=None, description="vLLM: eos does not end generation (stop_token_ids still do)."
    )
    include_stop_str_in_output: bool | None = Field(
        default=None, description="vLLM: keep the stop string at the end of the text."
    )
    no_stop_trim: bool | None = Field(
        default=None, description="sglang's name of include_stop_str_in_output."
    )
    skip_special_tokens: bool | None = Field(
        default=None, description="vLLM: leave special tokens out of the text (default true)."
    )
    truncate_prompt_tokens: int | None = Field(
        default=None, ge=-1, description="vLLM: keep only the prompt's last k tokens (-1: as "
        "many as the model takes).",
    )  # fmt: skip
    return_token_ids: bool | None = Field(
        default=None,
        description="vLLM: add `prompt_token_ids` and each choice's `token_ids` to the answer.",
    )
    return_hidden_states: bool | None = Field(
        default=None, description="sglang: only false (use `output_hidden_states`)."
    )
    prompt_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=PROMPT_LOGPROBS_MAX,
        description="vLLM: every prompt token's log-prob given the tokens before it, with this "
        "many top alternatives (0: the token's own only); answered in vLLM's shape.",
    )
    separate_reasoning: Any = Field(default=None, description=f"sglang. {_IGNORED}")
    stream_reasoning: Any = Field(default=None, description=f"sglang. {_IGNORED}")
    # OpenAI fields with no meaning here: accepted (any value), logged at debug, ignored.
    metadata: Any = Field(default=None, description=_IGNORED)
    store: Any = Field(default=None, description=_IGNORED)
    service_tier: Any = Field(default=None, description=_IGNORED)
    modalities: Any = Field(default=None, description=f"{_IGNORED} The output is text.")
    audio: Any = Field(default=None, description=f"{_IGNORED} The output is text.")
    reasoning_effort: Any = Field(default=None, description=_IGNORED)
    verbosity: Any = Field(default=None, description=_IGNORED)
    prompt_cache_key: Any = Field(
        default=None, description=f"{_IGNORED} Equal prefixes share KV blocks anyway."
    )
    prompt_cache_options: Any = Field(default=None, description=_IGNORED)
    prompt_cache_retention: Any = Field(default=None, description=_IGNORED)
    safety_identifier: Any = Field(default=None, description=_IGNORED)
    moderation: Any = Field(default=None, description=_IGNORED)
    web_search_options: Any = Field(default=None, description=_IGNORED)
    prediction: Any = Field(default=None, description=f"{_IGNORED} The output is the same.")
    parallel_tool_calls: Any = Field(default=None, description=_IGNORED)
    tools: list[Any] | None = Field(
        default=None,
        description='Tool calling is not supported: tools with tool_choice other than "none" '
        "is a 400; with tool_choice none (or empty) they are ignored.",
    )
    tool_choice: Any = Field(default=None, description='Only "none" matters with tools.')
    functions: list[Any] | None = Field(
        default=None, description='As tools (deprecated OpenAI form; function_call "none").'
    )
    function_call: Any = Field(default=None, description='Only "none" matters with functions.')

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
    max_completion_tokens: int | None = Field(
        default=None, description="Chat's name of max_tokens (wins when both are given).",
        **_NEW_TOKENS,
    )  # fmt: skip
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


class PromptTokenLogprob(BaseModel):
    """vLLM's Logprob: one entry of a prompt position's {token id: entry} dict."""

    logprob: float = Field(description="-inf is sent as -9999.0 (as vLLM and OpenAI).")
    rank: int | None = Field(default=None, description="1 = the most likely token.")
    decoded_token: str | None = None


# vLLM's prompt_logprobs: None for the first token, then {token id: entry}: the prompt's own
# token first, then the top alternatives.
PromptLogprobs = list[dict[int, PromptTokenLogprob] | None]


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
    prompt_token_ids: list[int] | None = Field(
        default=None, description="With return_token_ids (vLLM): the prompt's ids."
    )
    token_ids: list[int] | None = Field(
        default=None, description="With return_token_ids (vLLM): the generated ids."
    )
    prompt_logprobs: PromptLogprobs | None = Field(
        default=None, description="With prompt_logprobs (vLLM): the prompt's log-probs."
    )


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
    """One served name (--served-model-name aliases are each a card; all are the same model),
    or a LoRA adapter (vLLM's shape: `root` its path, `parent` the base model's id)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kogpt-serve"
    max_model_len: int
    root: str | None = None
    parent: str | None = None


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"lora_name": "poem", "lora_path": "/adapters/poem"}]},
    )

    lora_name: str = Field(min_length=1, description="The name requests select it by.")
    lora_path: str = Field(min_length=1, description="A peft LoRA adapter directory.")
    load_inplace: bool = Field(
        default=False,
        description="vLLM's: replace an adapter already loaded under `lora_name` (running "
        "requests finish with the old weights; new ones get the new).",
    )
    base_model_name: str | None = Field(
        default=None,
        min_length=1,
        description="Ours (the key of vLLM's --lora-modules JSON): the served full model the "
        "adapter is for; default: the default model.",
    )


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body (`lora_int_id` is accepted and unused)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"lora_name": "poem"}]}
    )

    lora_name: str = Field(min_length=1, description="A loaded adapter's name.")
    lora_int_id: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description='"invalid_request_error" for request errors (400, 404).')
    param: str | None = None
    code: int | str = Field(
        description='OpenAI\'s code where one exists ("model_not_found", '
        '"context_length_exceeded"), else the HTTP status.'
    )


class OpenAIErrorResponse(BaseModel):
    """Error body of the /v1/* routes (same content as ErrorResponse, OpenAI's envelope)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "`top_p` must be in (0, 1], got 1.5",
                        "type": "invalid_request_error",
                        "param": "top_p",
                        "code": 400,
                    }
                }
            ]
        }
    )

    error: OpenAIErrorDetail
