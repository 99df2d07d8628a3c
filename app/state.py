"""Composition root: load the model, size the KV cache, build and start the engine."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import Request

from app import __version__
from app.config import Settings
from app.engine.async_engine import AsyncEngine
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.model_runner import kv_bytes_per_block
from app.modeling.loader import LoadedModel, load_model

logger = logging.getLogger("kogpt.server")

CPU_DEFAULT_KV_GIB = 2.0  # default KV pool on CPU hosts when nothing is configured


@dataclass
class ServerState:
    settings: Settings
    loaded: LoadedModel
    engine: AsyncEngine
    model_name: str
    max_input_tokens: int
    max_total_tokens: int
    started_at: float = field(default_factory=time.time)
    ready: bool = False
    metrics: Any = None  # app.metrics.ServerMetrics, created by the app's lifespan
    inflight: int = 0  # generation requests the HTTP side is serving now
    # Set when the shutdown grace period is over: in-flight requests are cut (503).
    # A threading.Event: apps in other event loops may share this state.
    cutoff: threading.Event = field(default_factory=threading.Event)

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def n_positions(self) -> int:
        return int(self.loaded.config.n_positions)

    def generation_defaults(self) -> dict[str, Any]:
        return self.loaded.generation_config.to_dict()


def resolve_num_blocks(settings: Settings, config: Any, dtype: torch.dtype) -> int:
    """KV blocks from the settings: explicit count, or a memory size, or the CPU default.

    Never fewer than one full-length sequence needs, so every valid request can run.
    """
    per_block = kv_bytes_per_block(config, settings.block_size, dtype)
    min_blocks = -(-int(config.n_positions) // settings.block_size)
    if settings.num_kv_blocks is not None:
        blocks = settings.num_kv_blocks
    else:
        gib = settings.kv_cache_memory_gb or CPU_DEFAULT_KV_GIB
        wanted = settings.max_num_seqs * min_blocks
        blocks = min(wanted, int(gib * 2**30) // per_block)
    if blocks < min_blocks:
        raise ValueError(
            f"the KV cache has {blocks} blocks but one {config.n_positions}-token sequence needs "
            f"{min_blocks}; raise --num-kv-blocks or --kv-cache-memory-gb"
        )
    return blocks


def build_state(settings: Settings) -> ServerState:
    started = time.monotonic()
    loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    config = loaded.config
    num_blocks = resolve_num_blocks(settings, config, loaded.dtype)
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
        ),
    )
    async_engine = AsyncEngine(engine, settings.max_waiting_requests)
    n_positions = int(config.n_positions)
    max_total = min(settings.max_total_tokens or n_positions, n_positions)
    max_input = min(settings.max_input_tokens or max_total - 1, max_total - 1)
    name = settings.served_model_name or Path(settings.model).name or settings.model
    logger.info(
        "loaded %s on %s (%s) in %.1fs; KV cache %d blocks x %d tokens",
        name,
        loaded.device,
        loaded.dtype,
        time.monotonic() - started,
        num_blocks,
        settings.block_size,
    )
    return ServerState(settings, loaded, async_engine, name, max_input, max_total)


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the server state created by the lifespan."""
    return request.app.state.server


def info_dict(state: ServerState) -> dict[str, Any]:
    cfg = state.loaded.config
    engine = state.engine.engine
    return {
        "model_id": state.model_name,
        "model_path": state.settings.model,
        "model_type": cfg.model_type,
        "version": __version__,
        "device": str(state.loaded.device),
        "dtype": str(state.loaded.dtype).removeprefix("torch."),
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
        "kv_cache": {
            "num_blocks": engine.kv.num_blocks,
            "block_size": engine.kv.block_size,
            "prefix_caching": state.settings.enable_prefix_caching,
        },
    }
