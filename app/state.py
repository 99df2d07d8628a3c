"""Composition root: load the model, size the KV cache, build and start the engine."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request

from app import __version__
from app.config import Settings
from app.engine.async_engine import AsyncEngine
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.lora_registry import LoRALimitError, LoRALoadError, LoRANameError
from app.engine.spec.draft_model import check_same_tokenizer
from app.engine.transformers_version import (
    MATCHED_TRANSFORMERS,
    installed_transformers,
    transformers_mismatch,
)
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_sizing import KVSizing, KVSizingError, resolve_kv_sizing
from app.modeling.loader import LoadedModel, load_model

logger = logging.getLogger("kogpt.server")


class ModelSetError(ValueError):
    """The --model entries cannot be served together (the message says which and why)."""


@dataclass
class ServedModel:
    """One full model of the server (--model): the names requests select it by (the first
    is the reported one) and what was loaded; `engine_name` is how the engine knows it
    (None: the default, the first)."""

    names: list[str]
    path: str
    loaded: LoadedModel
    engine_name: str | None

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def config(self) -> Any:
        return self.loaded.config

    def generation_defaults(self) -> dict[str, Any]:
        return self.loaded.generation_config.to_dict()


@dataclass
class ServerState:
    settings: Settings
    loaded: LoadedModel  # the default model's (models[0].loaded)
    engine: AsyncEngine
    model_name: str  # the default model's reported name
    max_input_tokens: int
    max_total_tokens: int
    kv_sizing: KVSizing | None = None
    models: list[ServedModel] = field(default_factory=list)  # the default first
    started_at: float = field(default_factory=time.time)
    ready: bool = False
    metrics: Any = None  # app.metrics.ServerMetrics, created by the app's lifespan
    inflight: int = 0  # generation requests the HTTP side is serving now
    # Set when the shutdown grace period is over: in-flight requests are cut (503).
    # A threading.Event: apps in other event loops may share this state.
    cutoff: threading.Event = field(default_factory=threading.Event)
    # Sequences each HTTP request has in the engine (serving.RequestShares, created on first
    # use; --max-request-share).
    request_shares: Any = None

    def __post_init__(self) -> None:
        if not self.models:  # one model: the state's own (a state built without the list)
            names = [self.model_name, *self.settings.served_model_names]
            unique = list(dict.fromkeys(names))
            self.models = [
                ServedModel(unique, self.settings.model_specs[0].path, self.loaded, None)
            ]

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def n_positions(self) -> int:
        return int(self.loaded.config.n_positions)

    def generation_defaults(self) -> dict[str, Any]:
        return self.loaded.generation_config.to_dict()

    def model_named(self, name: str | None) -> ServedModel:
        """The full model an engine name (SamplingParams.model_name) means; None: default."""
        return next((m for m in self.models if m.engine_name == name), self.models[0])


def build_state(settings: Settings) -> ServerState:
    started = time.monotonic()
    logger.info("generate semantics of transformers %s", MATCHED_TRANSFORMERS)
    if mismatch := transformers_mismatch():
        logger.warning("%s", mismatch)
    models = load_models(settings)
    loaded = models[0].loaded
    config = loaded.config
    draft = load_draft_model(settings, loaded)  # first: its weights and KV are in the sizing
    sizing = resolve_kv_sizing(
        settings,
        PagedGPT2.from_hf(loaded.model),
        draft_config=draft.config if draft else None,
        more_models=[PagedGPT2.from_hf(m.loaded.model) for m in models[1:]],
    )
    num_blocks = sizing.num_blocks
    try:
        engine = LLMEngine(
            loaded.model,
            loaded.tokenizer,
            EngineConfig(
                num_blocks=num_blocks,
                block_size=settings.block_size,
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
                enable_prefix_caching=settings.enable_prefix_caching,
                seed=settings.seed,
                linear_backend=settings.linear_backend,
                quantize=settings.quantize,
                enforce_eager=settings.enforce_eager,
                native_kernels=settings.native_kernels,
                batch_invariant=settings.batch_invariant,
                async_scheduling=settings.async_scheduling,
                max_loras=settings.max_loras,
                max_lora_rank=settings.max_lora_rank,
            ),
            draft_model=draft.model if draft else None,
            more_models={m.name: m.loaded.model for m in models[1:]},
            model_name=models[0].name,
        )
    except torch.OutOfMemoryError as exc:
        raise KVSizingError(
            f"out of device memory allocating {sizing.describe()} or capturing the decode "
            "CUDA graphs: lower --gpu-memory-utilization, --kv-cache-memory-gb or "
            "--num-kv-blocks, or set --enforce-eager"
        ) from exc
    load_lora_modules(settings, engine)
    async_engine = AsyncEngine(engine, settings.max_waiting_requests)
    n_positions = int(config.n_positions)
    max_total = min(settings.max_total_tokens or n_positions, n_positions)
    max_input = min(settings.max_input_tokens or max_total - 1, max_total - 1)
    name = models[0].name
    logger.info(
        "loaded %s on %s (%s) in %.1fs; %s, %d tokens per block",
        ", ".join(m.name for m in models),
        loaded.device,
        loaded.dtype,
        time.monotonic() - started,
        sizing.describe(),
        settings.block_size,
    )
    return ServerState(settings, loaded, async_engine, name, max_input, max_total, sizing, models)


def load_models(settings: Settings) -> list[ServedModel]:
    """--model's entries, loaded on one device in one dtype. They share the engine's block
    pool, steps and sampler, so every model must have the default's tokenizer (ids mean the
    same), vocab_size and n_positions (the server's limits); layers and width may differ (a
    model of another KV layout gets its own KV tensors over the same block ids)."""
    specs = settings.model_specs
    first = load_model(specs[0].path, device=settings.device, dtype=settings.dtype)
    models = [ServedModel(settings.served_model_names, specs[0].path, first, None)]
    for spec in specs[1:]:
        if spec.name in models[0].names:
            raise ModelSetError(f"--model {spec.name}: the default model already has that name")
        loaded = load_model(spec.path, device=str(first.device), dtype=settings.dtype)
        if loaded.dtype != first.dtype:
            loaded.model.to(first.dtype)
            loaded.dtype = first.dtype
        if loaded.tokenizer.get_vocab() != first.tokenizer.get_vocab():
            raise ModelSetError(
                f"--model {spec.name}={spec.path}: its tokenizer differs from the default "
                f"model's ({specs[0].path}); models served together must share the tokenizer "
                "(fine-tunes of one base). Serve it from another server."
            )
        for key in ("vocab_size", "n_positions"):
            mine, theirs = getattr(loaded.config, key), getattr(first.config, key)
            if mine != theirs:
                raise ModelSetError(
                    f"--model {spec.name}={spec.path}: {key} is {mine}, the default model's is "
                    f"{theirs}; models served together must have the same {key}"
                )
        models.append(ServedModel([spec.name], spec.path, loaded, spec.name))
    return models


class LoRAStartupError(RuntimeError):
    """An adapter of --lora-modules cannot be served (the message names it and says why)."""


def load_lora_modules(settings: Settings, engine: LLMEngine) -> None:
    """--lora-modules: every adapter loaded now; the first that fails stops the start-up."""
    engine.lora.reserved_names |= frozenset(settings.served_model_names)
    for name, module in settings.lora_module_paths.items():
        try:
            adapter = engine.lora.load(name, module.path, module.base_model_name)
        except (LoRALoadError, LoRANameError, LoRALimitError) as exc:
            raise LoRAStartupError(f"--lora-modules {name}={module.path}: {exc}") from exc
        logger.info("LoRA adapter %s (rank %d) loaded from %s", name, adapter.rank, module.path)


def load_draft_model(settings: Settings, loaded: LoadedModel) -> LoadedModel | None:
    """--draft-model: loaded like the model (same device and dtype); its tokenizer must be
    the model's. Its KV cache has the model's number of blocks; the KV sizing counts both
    caches' bytes per block (--kv-cache-memory-gb and the GPU budget cover the two)."""
    if not settings.draft_model:
        return None
    draft = load_model(settings.draft_model, device=str(loaded.device), dtype=settings.dtype)
    if draft.dtype != loaded.dtype:
        draft.model.to(loaded.dtype)
    check_same_tokenizer(draft.tokenizer, loaded.tokenizer)
    logger.info("draft model %s loaded for speculative decoding", settings.draft_model)
    return draft


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the server state created by the lifespan."""
    return request.app.state.server


def info_dict(state: ServerState) -> dict[str, Any]:
    cfg = state.loaded.config
    engine = state.engine.engine
    return {
        "model_id": state.model_name,
        "model_path": state.models[0].path,
        "models": [
            {"name": m.name, "aliases": m.names[1:], "path": m.path, "n_layer": m.config.n_layer}
            for m in state.models
        ],
        "model_type": cfg.model_type,
        "version": __version__,
        "transformers_version": installed_transformers(),
        "generate_matches_transformers": MATCHED_TRANSFORMERS,
        "device": str(state.loaded.device),
        "dtype": str(state.loaded.dtype).removeprefix("torch."),
        "linear_backend": engine.runner.model.linears().backend,
        "native_kernels": engine.runner.model.uses_native(),
        "decode_kernel": engine.runner.model.decode_kernel(),
        "batch_invariant": engine.runner.model.is_batch_invariant(),
        "decode_cuda_graphs": engine.runner.num_decode_graphs,  # 0: every step eager
        "config": {
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_head": cfg.n_head,
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.n_positions,
        },
        "max_input_tokens": state.max_input_tokens,
        "max_total_tokens": state.max_total_tokens,
        "max_num_seqs": state.settings.max_num_seqs,
        "max_num_batched_tokens": state.settings.max_num_batched_tokens,
        "max_waiting_requests": state.settings.max_waiting_requests,
        "max_request_sequences": state.settings.max_request_sequences,
        "max_constraint_work": state.settings.max_constraint_work,
        "max_contrastive_work": state.settings.max_contrastive_work,
        "max_dola_work": state.settings.max_dola_work,
        "lora_adapters": [
            {
                "name": name,
                "path": served.adapter.path,
                "rank": served.adapter.rank,
                "parent": state.models[served.base].name,
            }
            for name, served in engine.lora.served().items()
        ],
        "max_loras": engine.lora.max_loras,
        "max_lora_rank": engine.lora.max_lora_rank,
        "kv_cache": {
            "num_blocks": engine.kv.num_blocks,
            "block_size": engine.kv.block_size,
            "prefix_caching": state.settings.enable_prefix_caching,
            "sizing": state.kv_sizing.as_dict() if state.kv_sizing else None,
        },
    }
