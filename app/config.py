"""Server settings: KOGPT_* environment variables and `kogpt-serve` CLI flags.

One pydantic-settings model; the CLI builds its flags from these fields, so `--help`,
the environment and the README table cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_model_path() -> str:
    from app.modeling.loader import DEFAULT_MODEL_DIR

    return str(DEFAULT_MODEL_DIR)


@dataclass(frozen=True)
class ModelSpec:
    """One --model entry: the name the API selects it by and its checkpoint."""

    name: str
    path: str
    named: bool  # given as NAME=PATH (a bare path is named after its directory)


def parse_model_specs(value: str) -> list[ModelSpec]:
    """--model entries (the flag repeated, or a comma list in KOGPT_MODEL): ``NAME=PATH`` or
    a bare path (or hub id), named after its last path part. ValueError naming the entry that
    is malformed or whose name repeats."""
    specs: list[ModelSpec] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            raise ValueError(f"model: an empty entry in {value!r}")
        name, sep, path = entry.partition("=")
        if sep and not Path(entry).exists():  # NAME=PATH (a path may hold "=" itself)
            if not name or not path:
                raise ValueError(f"model: {entry!r} is neither NAME=PATH nor a path")
            spec = ModelSpec(name, path, True)
        else:
            spec = ModelSpec(Path(entry).name or entry, entry, False)
        if any(s.name == spec.name for s in specs):
            raise ValueError(f"model: two models are named {spec.name!r}; name them with NAME=PATH")
        specs.append(spec)
    return specs


@dataclass(frozen=True)
class LoRAModule:
    path: str
    base_model_name: str | None = None  # the served model it adapts (None: the default)


def parse_lora_modules(value: str | None) -> dict[str, LoRAModule]:
    """vLLM's --lora-modules entries, separated by spaces or commas: ``NAME=PATH`` or a JSON
    object ``{"name": ..., "path": ..., "base_model_name": ...}`` -> {name: module}
    (ValueError naming the entry that is malformed or repeats a name)."""
    modules: dict[str, LoRAModule] = {}
    text, pos, decoder = value or "", 0, json.JSONDecoder()
    while pos < len(text):
        if text[pos] in " ,\t\n":
            pos += 1
            continue
        if text[pos] == "{":
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                at = text[pos : pos + 40]
                raise ValueError(f"lora_modules: bad JSON entry at {at!r}: {exc}") from None
            keys = {"name", "path", "base_model_name"}
            if not isinstance(obj, dict) or not {"name", "path"} <= set(obj) or set(obj) - keys:
                raise ValueError(
                    f"lora_modules: {obj!r} needs exactly `name`, `path` and optionally "
                    "`base_model_name`"
                )
            name, module = (
                str(obj["name"]),
                LoRAModule(str(obj["path"]), obj.get("base_model_name")),
            )
        else:
            end = pos
            while end < len(text) and text[end] not in " ,\t\n":
                end += 1
            entry, pos = text[pos:end], end
            name, sep, path = entry.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules: {entry!r} is not NAME=PATH")
            module = LoRAModule(path)
        if not name or not module.path:
            raise ValueError(f"lora_modules: an entry has an empty name or path: {name!r}")
        if name in modules:
            raise ValueError(f"lora_modules: the name {name!r} is given twice")
        modules[name] = module
    return modules


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOGPT_", extra="ignore", protected_namespaces=())

    model: str = Field(
        default_factory=default_model_path,
        description="Checkpoint directory or hub id (default: the embedded model in models/). "
        "Several full models: repeat the flag as NAME=PATH (a comma list in the env var); the "
        "first is the default, requests select one by name (/v1 `model`, TGI "
        "`parameters.adapter_id`). They must share the tokenizer and n_positions; their "
        "requests share the KV block pool and run in the same steps.",
        json_schema_extra={"repeat": True},
    )
    draft_model: str | None = Field(
        default=None,
        description="A smaller checkpoint with the same tokenizer that drafts tokens for the "
        "model (speculative decoding: faster, identical output; enables the assisted-decoding "
        "options).",
    )
    served_model_name: str | None = Field(
        default=None,
        description="Model name(s) the API answers to, comma-separated aliases; the first is "
        "the name responses report (default: the directory name).",
    )
    strict_model_name: bool = Field(
        default=False,
        description="/v1: a `model` that is none of the served names is a 404 model_not_found. "
        "Default: any name is accepted and answered by the one served model (TGI's behaviour).",
    )
    lora_modules: str | None = Field(
        default=None,
        description="LoRA adapters (peft format) loaded at start, as NAME=PATH entries (several "
        "after the flag, or separated by spaces or commas in the env var) for the default "
        'model, or vLLM\'s JSON {"name", "path", "base_model_name"} for another served '
        "model; a request selects one by name (/v1 `model`, TGI `parameters.adapter_id`). A bad "
        "path or an adapter that does not fit its model fails the start-up, naming the adapter.",
        json_schema_extra={"nargs": "+"},
    )
    max_loras: int = Field(
        default=8,
        ge=0,
        description="Most LoRA adapters loaded at once (start-up and /v1/load_lora_adapter).",
    )
    max_lora_rank: int = Field(
        default=64, ge=1, le=64, description="Largest LoRA rank an adapter may have (1..64)."
    )
    host: str = Field(default="127.0.0.1", description="Address to bind.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port to bind.")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = Field(
        default="auto", description="Weights and KV dtype; auto = fp16/bf16 on GPU, fp32 on CPU."
    )
    linear_backend: Literal["auto", "aten", "mkldnn"] = Field(
        default="auto",
        description="Matmul backend: auto = oneDNN with prepacked weights for float32 on CPU "
        "(faster; one extra copy of the weights), torch's own matmul elsewhere; aten = always "
        "torch's own (bit-identical to transformers).",
    )
    native_kernels: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="C kernels for float32 on CPU (decode attention reading the paged KV "
        "blocks in place, gelu_new in one pass), compiled once with the system C compiler: "
        "auto = use them where they apply and build (torch ops otherwise, with a warning); "
        "on = require them; off = torch ops only (block gather + SDPA attention; on CUDA "
        "this also turns off the Triton decode attention kernel).",
    )
    batch_invariant: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Batch-invariant inference (docs/reproducibility.md): a request's logits "
        "and log-probs are bit-identical whatever else runs in its batch and however its "
        "tokens are scheduled (matmuls in row-invariant calls, every token's attention as "
        "one native-kernel row). auto = on where it applies (float32 on CPU with the native "
        "kernels, no --quantize); on = require it (start-up error elsewhere); off.",
    )
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="int8: every matmul (LM head included) in dynamic int8 (weights per "
        "channel, activations per call; fbgemm); faster decode on CPU, slightly different "
        "logits (lossy). float32 on CPU only: anything else fails at start-up.",
    )
    max_num_seqs: int = Field(
        default=256, ge=1, description="Most sequences (beams included) in one step's batch."
    )
    max_num_batched_tokens: int = Field(
        default=2048,
        ge=16,
        description="Token budget of one engine step (prefill chunks + decodes).",
    )
    block_size: int = Field(default=16, ge=1, le=256, description="Tokens per KV cache block.")
    num_kv_blocks: int | None = Field(
        default=None,
        ge=1,
        description="KV cache blocks; default: as many as --kv-cache-memory-gb holds (at most "
        "max_num_seqs full-length sequences).",
    )
    kv_cache_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="KV cache size in GiB when --num-kv-blocks is not given (default: 2 on "
        "CPU; on CUDA sized by --gpu-memory-utilization).",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="On CUDA without --num-kv-blocks / --kv-cache-memory-gb: the share of GPU "
        "memory the server may use; the KV cache gets what the weights and a profiled "
        "largest step leave of it.",
    )
    enforce_eager: bool = Field(
        default=False,
        description="CUDA: do not capture CUDA graphs of decode steps (every step runs "
        "eagerly; saves the graphs' memory and start-up time, costs per-step launch "
        "overhead). No effect on CPU.",
    )
    async_scheduling: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Schedule and prepare step k+1 while step k runs (vLLM's async "
        "scheduling) when every running request is plain (greedy or temperature / top-k / "
        "top-p sampling, seeded or not; no logits processors, beams, n > 1, drafts, prompt "
        "log-probs or exclusive lanes): greedy and seeded outputs the same (unseeded draws "
        "may differ, as in vLLM), less device idle time between steps. auto = on for CUDA, "
        "off on CPU (0.96-1.01x measured there); on; off.",
    )
    enable_prefix_caching: bool = Field(default=True, description="Share KV of equal prefixes.")
    max_input_tokens: int | None = Field(
        default=None, ge=1, description="Longest prompt accepted (default: n_positions - 1)."
    )
    max_total_tokens: int | None = Field(
        default=None,
        ge=2,
        description="Longest prompt + output (default: the model's n_positions).",
    )
    max_waiting_requests: int = Field(
        default=1024, ge=1, description="Waiting-queue bound; past it requests get 429."
    )
    default_max_time_seconds: float | None = Field(
        default=None,
        gt=0,
        description="`max_time` for requests that set none (generate's MaxTimeCriteria: the "
        "request ends with finish reason length once it has run this long); default: none.",
    )
    max_constraint_work: int = Field(
        default=2048,
        ge=1,
        description="Most constraint tokens x num_beams one constrained beam search "
        "(force_words_ids / force_words / constraints) may ask for; past it a 422 naming the "
        "field. Its work per step grows with both.",
    )
    max_contrastive_work: int = Field(
        default=16384,
        ge=1,
        description="Most top_k x positions (prompt + new tokens) one contrastive search "
        "(penalty_alpha) may ask for: every step copies the KV cache once per top_k candidate "
        "and runs a forward of top_k rows; past it a 422 naming top_k.",
    )
    max_dola_work: int = Field(
        default=1_048_576,
        ge=1,
        description="Most premature layers x vocabulary logits one DoLa step (dola_layers) may "
        "compute (the contrast stacks a vocabulary row per listed layer, repeats included); "
        "past it a 422 naming dola_layers.",
    )
    max_request_sequences: int = Field(
        default=1024,
        ge=1,
        description="Most sequences one HTTP request may ask for: prompts x the sequences "
        "each runs (n / best_of / num_beams, + 1 for guidance); past it a 422 naming `prompt`. "
        "The prompt count is checked before any prompt is tokenized.",
    )
    max_request_share: int = Field(
        default=8,
        ge=1,
        description="Most sequences one HTTP request (its prompts x n / best_of / beams) has "
        "in the engine at once while other requests are being served (and 2 s after); its "
        "other prompts wait their turn outside the engine, so one client's largest request "
        "cannot starve the others. Alone it may have twice this; a prompt that asks for more "
        "sequences still runs (alone of its request). Raise it for batch throughput on GPUs.",
    )
    api_key: SecretStr | None = Field(
        default=None, description="If set, requests need `Authorization: Bearer <key>`."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level."
    )
    log_prompts: bool = Field(default=False, description="Log prompt and output text.")
    shutdown_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM: stop admitting (503), let in-flight requests finish for up "
        "to this long, then cut the rest and exit.",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1, description="Largest request body accepted (413 beyond)."
    )
    body_read_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Longest a client may take to send its whole request body; past it a 408 "
        "and the connection is closed (a slow-body client holds no socket for ever).",
    )
    header_read_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Longest a client may take to send a request line and its headers, from "
        "when the connection opens (or its next request begins); past it the connection is "
        "closed (a 408 when part of a request arrived).",
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        description="Most concurrent connections and requests the HTTP server serves (uvicorn's "
        "limit_concurrency); past it a 503 at once.",
    )
    cors_allow_origins: str | None = Field(
        default=None,
        description="Comma-separated origins allowed by CORS ('*' for any; default: no CORS).",
    )
    public_health_metrics: bool = Field(
        default=True,
        description="With --api-key: keep /health, /ready and /metrics open without the key.",
    )
    seed: int = Field(
        default=0, description="Seed of the engine's generator for unseeded requests."
    )
    exact_lane_max_floats: int = Field(
        default=2_000_000,
        ge=0,
        description="Most floats (attentions + hidden states) one output_attentions / "
        "output_hidden_states request may return from the exact lane; past it: 422.",
    )
    chat_template: str | None = Field(
        default=None,
        description="Chat template of /v1/chat/completions: a Jinja file path or the template "
        "itself (default: the tokenizer's own, else the built-in KoGPT-2 chatbot "
        "template <usr>question<sys>answer</s>).",
    )
    chat_allow_special_tokens: bool = Field(
        default=False,
        description="Tokenize special-token text (e.g. </s>, <sys>) inside chat message "
        "contents and few-shot task/examples/query as the special tokens, as raw prompts are. "
        "Default: as ordinary text, so a message cannot end its turn and forge another; "
        "enable only for trusted callers.",
    )

    @property
    def model_specs(self) -> list[ModelSpec]:
        """--model's entries, the default model first."""
        return parse_model_specs(self.model)

    @property
    def served_model_names(self) -> list[str]:
        """The default model's API names: --served-model-name's aliases, else its name (NAME=
        or the checkpoint's directory name); the first is the reported one. A NAME= name is
        kept as an alias after --served-model-name's."""
        first = self.model_specs[0]
        names = [n.strip() for n in (self.served_model_name or "").split(",") if n.strip()]
        if first.named and first.name not in names:
            names.append(first.name)
        return names or [first.name]

    @property
    def lora_module_paths(self) -> dict[str, LoRAModule]:
        """--lora-modules as name -> module (path, base model), in the order given."""
        return parse_lora_modules(self.lora_modules)

    @field_validator("model")
    @classmethod
    def _model_specs_parse(cls, value: str) -> str:
        parse_model_specs(value)  # fail at start on a malformed entry or a repeated name
        return value

    @field_validator("lora_modules")
    @classmethod
    def _lora_modules_parse(cls, value: str | None) -> str | None:
        parse_lora_modules(value)  # fail at start on a malformed entry
        return value

    @field_validator("chat_template")
    @classmethod
    def _chat_template_loads(cls, value: str | None) -> str | None:
        from app.prompts.chat_template import load_template_setting  # jinja2 only

        if value:
            load_template_setting(value)  # fail at start: no file, or a Jinja syntax error
        return value
