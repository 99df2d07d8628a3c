"""TGI wire format (/generate, /generate_stream, POST /) and the operational models.

The OpenAI models live in protocol/openai.py, the few-shot ones in protocol/fewshot.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from app.api.options import GenerateOptions
from app.options.registry import (
    DETAILS_OPTIONS,
    EXACT_LANE_OPTIONS,
    TGI_MODEL,
    names,
)
from app.options.schema import option_field, option_fields

DETAILS_FLAGS = (*DETAILS_OPTIONS, *EXACT_LANE_OPTIONS)
TGI_ONLY = names(model=TGI_MODEL)  # TGI's own parameters (not generate options)
# Set (not null), any of these turns sampling on at TGI's routes (TGI's validation.rs).
TGI_SAMPLING_WARPERS = ("temperature", "top_k", "top_p", "typical_p")


class _TGIParameters(GenerateOptions):  # type: ignore[misc, valid-type]
    """GenerateParameters' behaviour; its fields are generated from the option registry."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"max_new_tokens": 32, "do_sample": True, "top_p": 0.92, "seed": 42},
                {"max_new_tokens": 16, "details": True},
            ]
        },
    )

    @model_validator(mode="after")
    def _output_flags_mean_details(self) -> Any:
        """output_scores / output_logits / return_dict_in_generate (and the exact lane's
        output_attentions / output_hidden_states) ask for what `details` returns."""
        if any(getattr(self, name) for name in DETAILS_FLAGS):
            self.details = True
        return self

    def generate_options(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(engine options, renames): options for the resolve step, and how to name an engine
        field in an error (e.g. num_return_sequences set by best_of -> best_of)."""
        data = self.engine_options(exclude=TGI_ONLY)
        renames: dict[str, str] = {}
        if self.stop:
            stops = data.get("stop_strings") or []
            data["stop_strings"] = [*([stops] if isinstance(stops, str) else stops), *self.stop]
        if self.best_of is not None and self.best_of > 1:
            data.setdefault("num_return_sequences", self.best_of)
            renames["num_return_sequences"] = "best_of"
        if self.watermark and "watermarking_config" not in data:
            data["watermarking_config"] = {}
            renames["watermarking_config"] = "watermark"
        return data, renames

    def tgi_options(self) -> tuple[dict[str, Any], dict[str, str]]:
        """`generate_options` with TGI's rule on top (router/src/validation.rs): sampling is
        on when `do_sample` is true or any of temperature / top_k / top_p / typical_p is set
        (`model.generate` samples only with do_sample=true). Departures for what TGI does not
        have: temperature 0 (which TGI refuses) means greedy, and top_k with penalty_alpha is
        contrastive search's candidate count; neither turns sampling on. For /generate,
        /generate_stream and POST / only; few-shot and /v1 keep `model.generate`'s rule."""
        data, renames = self.generate_options()
        warpers = [n for n in TGI_SAMPLING_WARPERS if data.get(n) is not None]
        if data.get("temperature") == 0:
            warpers.remove("temperature")
        if data.get("penalty_alpha") and "top_k" in warpers:
            warpers.remove("top_k")
        if warpers:
            data["do_sample"] = True
        return data, renames


GenerateParameters = create_model(
    "GenerateParameters",
    __base__=_TGIParameters,
    __doc__="""Generate options: every `model.generate` option plus TGI's own parameters.

Omitted (or null) options take the checkpoint's generation_config defaults exactly as
`model.generate` does (greedy, 20 new tokens, top_k 50 when sampling, ...). On /generate,
/generate_stream and POST / TGI's rule applies on top: a temperature (other than 0), top_k,
top_p or typical_p that is set turns sampling on; /few-shot keeps `model.generate`'s.
Unknown fields are rejected with 422 so a typo is never silently ignored.""",
    __module__=__name__,
    **option_fields(TGI_ONLY),
)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"inputs": "대한민국은", "parameters": {"max_new_tokens": 20}},
                {
                    "inputs": "모든 국민은",
                    "parameters": {"max_new_tokens": 30, "do_sample": True, "seed": 7},
                },
            ]
        },
    )

    inputs: str = Field(default="", description="The prompt text.")
    input_ids: list[int] | None = option_field("input_ids")[1]
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(default=False, description="POST /: stream (SSE) instead of JSON.")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if self.input_ids is not None and self.inputs:
            raise ValueError("give either `inputs` (text) or `input_ids`, not both")
        return self


class Token(BaseModel):
    id: int
    text: str = Field(description="Text this token completes (UTF-8 safe; may be empty).")
    logprob: float | None = None
    special: bool


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


FinishReasonName = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReasonName
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


def _is_none(value: Any) -> bool:
    return value is None


class Details(BaseModel):
    finish_reason: FinishReasonName
    generated_tokens: int
    input_length: int | None = Field(default=None, description="Prompt tokens.")
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None
    # Only in exact-lane responses (omitted otherwise: TGI's wire format is unchanged).
    attentions: list[Any] | None = Field(
        default=None,
        exclude_if=_is_none,
        description="output_attentions (exact lane): transformers' layout as nested lists, "
        "[step][layer][row][head][query][key].",
    )
    hidden_states: list[Any] | None = Field(
        default=None,
        exclude_if=_is_none,
        description="output_hidden_states (exact lane): [step][embeddings + layers][row]"
        "[position][hidden].",
    )


class GenerateResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"generated_text": " 민주공화국이다.", "details": None}]}
    )

    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReasonName
    generated_tokens: int
    input_length: int
    seed: int | None = None


class StreamResponse(BaseModel):
    """One SSE `data:` event; the last one carries generated_text and details (usage)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "index": 1,
                    "token": {"id": 9349, "text": " 민주", "logprob": -0.8, "special": False},
                    "generated_text": None,
                    "details": None,
                    "top_tokens": None,
                }
            ]
        }
    )

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(BaseModel):
    """Error body of every route except /v1/*."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "`top_p` must be in (0, 1], got 1.5",
                    "error_type": "validation",
                    "field": "top_p",
                }
            ]
        }
    )

    error: str
    error_type: str
    field: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready", "starting", "draining", "unhealthy"]


class KVCacheInfo(BaseModel):
    num_blocks: int
    block_size: int
    prefix_caching: bool
    sizing: dict[str, Any] | None = Field(
        default=None,
        description="How the pool was sized: source (num_kv_blocks, kv_cache_memory_gb, "
        "gpu_memory_utilization, cpu_default), bytes per block, KV GiB and, on CUDA, the "
        "profiled weights / activation peak / memory outside torch in bytes.",
    )


class InfoResponse(BaseModel):
    """Model, limits and server facts (TGI's /info names included)."""

    model_config = ConfigDict(extra="allow")

    model_id: str
    model_path: str
    model_type: str
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str = "text-generation"
    version: str
    transformers_version: str = Field(description="The transformers installed in the server.")
    generate_matches_transformers: str = Field(
        description="The transformers release whose `model.generate` the engine reproduces "
        "(the locked one); the server warns at start when the installed one differs."
    )
    router: str = "kogpt-serve"
    device: str
    dtype: str
    linear_backend: str = Field(
        description="Matmul backend in use: aten, mkldnn or int8-fbgemm (--quantize int8)."
    )
    native_kernels: bool = Field(
        description="Whether the C kernels run (float32 on CPU, --native-kernels): decode "
        "attention reading the paged KV blocks in place and a one-pass gelu_new; false: torch "
        "ops only (block gather + SDPA attention)."
    )
    decode_kernel: str | None = Field(
        default=None,
        description="The kernel decode attention reads the paged K/V blocks with: `native` "
        "(C, float32 CPU), `triton` (CUDA), or null (blocks gathered, then SDPA).",
    )
    batch_invariant: bool = Field(
        description="Whether steps run batch-invariant (--batch-invariant; float32 on CPU): a "
        "request's logits and log-probs do not depend on the rest of its batch or on how its "
        "tokens were scheduled (docs/reproducibility.md)."
    )
    config: dict[str, Any]
    max_input_tokens: int
    max_input_length: int = Field(description="TGI's name for max_input_tokens.")
    max_total_tokens: int
    max_best_of: int
    max_stop_sequences: int | None = None
    max_concurrent_requests: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting_requests: int
    max_request_sequences: int = Field(
        description="Most sequences one request may ask for (prompts x n / best_of / beams)."
    )
    max_constraint_work: int = Field(
        description="Most constraint tokens x num_beams one constrained beam search may take."
    )
    max_contrastive_work: int = Field(
        description="Most top_k x positions (prompt + new tokens) of one contrastive search."
    )
    max_dola_work: int = Field(
        description="Most premature layers x vocabulary logits one DoLa step may compute."
    )
    kv_cache: KVCacheInfo


class TokenInfo(BaseModel):
    id: int
    text: str = Field(description="The token's text (may be a partial character).")
    start: int = Field(description="Character offset of the token's text in `inputs`.")
    stop: int


class DetokenizeResponse(BaseModel):
    text: str
