"""How many KV blocks the server allocates, and why.

Explicit `--num-kv-blocks` wins, then `--kv-cache-memory-gb`. Otherwise on CUDA the pool
takes what `--gpu-memory-utilization` of the GPU leaves after the weights, memory outside
torch (CUDA context, other processes) and the activation peak of a profiling step at the
largest batch (`max_num_batched_tokens` prompt tokens, `max_num_seqs` logits rows and their
float32 sampler copies), as vLLM does. On CPU the default is CPU_DEFAULT_KV_GIB. The count is
capped at what `max_num_seqs` full-length sequences can use, and must hold one of them.

Where decode steps run as CUDA graphs (CUDA without `--enforce-eager`), the graphs' memory
comes out of the same budget before the KV pool: the padded decode's static buffers, its
scratch KV block and the activations of its largest shape, profiled by running that shape
eagerly (the graphs share one pool, captured largest first, so the largest one sets its size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.cuda_graphs import DecodeGraphs
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache, kv_layout

CPU_DEFAULT_KV_GIB = 2.0  # default KV pool on CPU hosts when nothing is configured
GIB = 2**30


class KVSizingError(ValueError):
    """The KV cache cannot be sized as configured; the message names the setting to change."""


class DeviceMemory(Protocol):
    """The few torch.cuda memory calls the profile needs (a fake stands in on CPU tests)."""

    def mem_get_info(self) -> tuple[int, int]: ...  # (free, total) bytes on the device
    def memory_allocated(self) -> int: ...
    def memory_reserved(self) -> int: ...
    def max_memory_allocated(self) -> int: ...
    def reset_peak(self) -> None: ...


class CudaMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mem_get_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def memory_allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def memory_reserved(self) -> int:
        return int(torch.cuda.memory_reserved(self.device))

    def max_memory_allocated(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)


@dataclass
class KVSizing:
    num_blocks: int
    source: str  # num_kv_blocks | kv_cache_memory_gb | gpu_memory_utilization | cpu_default
    bytes_per_block: int
    # GPU profile (bytes), when the pool was sized from free memory.
    total_memory: int | None = None
    weights: int | None = None
    activation_peak: int | None = None
    non_torch: int | None = None
    decode_graphs: int | None = None  # CUDA graphs' buffers, scratch block and pool

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["kv_gib"] = round(self.kv_bytes / GIB, 3)
        return out

    def describe(self) -> str:
        text = f"KV cache {self.num_blocks} blocks = {self.kv_bytes / GIB:.2f} GiB ({self.source})"
        if self.total_memory is not None:
            text += (
                f"; GPU {self.total_memory / GIB:.1f} GiB: weights {self.weights / GIB:.2f}, "  # type: ignore[operator]
                f"activation peak {self.activation_peak / GIB:.2f}, "  # type: ignore[operator]
                f"outside torch {self.non_torch / GIB:.2f} GiB"  # type: ignore[operator]
            )
        if self.decode_graphs is not None:
            text += f"; decode graphs {self.decode_graphs / GIB:.2f} GiB"
        return text


def blocks_for_budget(
    budget_bytes: int, bytes_per_block: int, min_blocks: int, max_blocks: int, hint: str
) -> int:
    blocks = min(max_blocks, max(0, budget_bytes) // bytes_per_block)
    if blocks < min_blocks:
        raise KVSizingError(
            f"the KV cache has room for {blocks} blocks ({max(0, budget_bytes) / GIB:.2f} GiB) "
            f"but one full-length sequence needs {min_blocks}; {hint}"
        )
    return blocks


def profile_step_seqs(
    num_tokens: int, num_seqs: int, n_positions: int, block_size: int
) -> list[SeqChunk]:
    """Prompt chunks of the largest step: `num_tokens` tokens over up to `num_seqs` sequences,
    each shorter than n_positions, block tables over a pool of exactly that many blocks."""
    seqs, next_block, left = [], 0, num_tokens
    count = max(1, min(num_seqs, num_tokens))
    per_seq = min(n_positions - 1, math.ceil(num_tokens / count))
    while left > 0:
        n = min(per_seq, left)
        blocks = math.ceil(n / block_size)
        seqs.append(SeqChunk([0] * n, 0, list(range(next_block, next_block + blocks))))
        next_block, left = next_block + blocks, left - n
    return seqs


def activation_peak_bytes(
    model: PagedGPT2, memory: DeviceMemory, max_tokens: int, max_seqs: int, block_size: int
) -> int:
    """Peak bytes one largest step allocates beyond the weights and its own scratch KV."""
    config = model.config
    seqs = profile_step_seqs(max_tokens, max_seqs, int(config.n_positions), block_size)
    num_blocks = sum(len(s.block_table) for s in seqs)
    memory.reset_peak()
    base = memory.memory_allocated()
    kv = KVCache.allocate(config, num_blocks, block_size, model.dtype, model.device)
    kv_bytes = memory.memory_allocated() - base
    step = build_step_input(
        seqs,
        block_size,
        model.device,
        max_positions=config.n_positions,
        paged_decode=model.paged_decode,
    )
    logits = model(step, kv)
    # The sampler's float32 copy, raw log-probs and probabilities for up to max_seqs rows.
    rows = logits[:1].float().expand(min(max_seqs, max_tokens), -1)
    sampler_work = [rows.clone(), torch.log_softmax(rows, -1), torch.softmax(rows, -1)]
    peak = memory.max_memory_allocated()
    del kv, step, logits, rows, sampler_work
    memory.reset_peak()
    return max(0, peak - base - kv_bytes)


def decode_graph_bytes(
    model: PagedGPT2, memory: DeviceMemory, max_seqs: int, block_size: int
) -> int:
    """Bytes the decode graphs keep: the padded decode's static buffers and scratch block,
    and the activation peak of its largest shape (the shared graph pool's size), profiled
    by running that shape eagerly over a one-block cache (the scratch block itself)."""
    memory.reset_peak()
    base = memory.memory_allocated()
    kv = KVCache.allocate(model.config, 1, block_size, model.dtype, model.device)
    graphs = DecodeGraphs(model, kv, max_seqs, scratch_block=0)
    largest = graphs.shapes[0]
    graphs.run(largest, graphs.prepare([], largest))  # padding rows only
    peak = memory.max_memory_allocated()
    del kv, graphs
    memory.reset_peak()
    return max(0, peak - base)


def size_from_gpu(
    model: PagedGPT2,
    memory: DeviceMemory,
    utilization: float,
    bytes_per_block: int,
    max_tokens: int,
    max_seqs: int,
    block_size: int,
    min_blocks: int,
    max_blocks: int,
    decode_graphs: bool = False,
    more_models: Sequence[PagedGPT2] = (),
) -> KVSizing:
    """``more_models``: the server's other full models (loaded: their weights are in
    ``memory_allocated``). A step runs one model's forward after another, so the peak is the
    largest model's; each model captures its own decode graphs."""
    weights = memory.memory_allocated()
    models = [model, *more_models]
    peak = max(activation_peak_bytes(m, memory, max_tokens, max_seqs, block_size) for m in models)
    graphs = (
        sum(decode_graph_bytes(m, memory, max_seqs, block_size) for m in models)
        if decode_graphs
        else None
    )
    free, total = memory.mem_get_info()
    non_torch = max(0, total - free - memory.memory_reserved())
    budget = int(total * utilization) - weights - peak - (graphs or 0) - non_torch
    used = (
        f"weights take {weights / GIB:.2f} GiB and a {max_tokens}-token step {peak / GIB:.2f} GiB"
    )
    fixes = f"raise --gpu-memory-utilization (now {utilization}), lower --max-num-batched-tokens"
    if graphs is not None:
        used += f", decode graphs {graphs / GIB:.2f} GiB"
        fixes += ", lower --max-num-seqs, set --enforce-eager"
    hint = f"{used} of {total / GIB:.1f} GiB: {fixes}, or set --num-kv-blocks"
    blocks = blocks_for_budget(budget, bytes_per_block, min_blocks, max_blocks, hint)
    return KVSizing(
        blocks, "gpu_memory_utilization", bytes_per_block, total, weights, peak, non_torch, graphs
    )


def resolve_kv_sizing(
    settings: Any,
    model: PagedGPT2,
    memory: DeviceMemory | None = None,
    decode_graphs: bool | None = None,
    draft_config: Any = None,
    more_models: Sequence[PagedGPT2] = (),
) -> KVSizing:
    """The pool size for these settings; `memory` defaults to CudaMemory on a CUDA model,
    `decode_graphs` (whether decode steps will run as CUDA graphs) to CUDA without
    --enforce-eager. An explicit --num-kv-blocks gets the graphs' scratch block on top.
    With a draft model (`draft_config`, loaded before sizing so its weights are counted)
    a block costs the draft's KV bytes too: the draft keeps a cache of as many blocks. With
    several full models (`more_models`), a model whose KV layout differs from the ones
    before it adds its bytes per block too (it keeps its own tensors over the same block
    ids); fine-tunes of one base share the tensors and cost nothing more per block."""
    config = model.config
    if decode_graphs is None:
        eager = bool(getattr(settings, "enforce_eager", False))
        decode_graphs = model.device.type == "cuda" and not eager
    per_block = KVCache.block_bytes(config, settings.block_size, model.dtype)
    if draft_config is not None:
        per_block += KVCache.block_bytes(draft_config, settings.block_size, model.dtype)
    layouts = {kv_layout(config)}
    for other in more_models:
        if kv_layout(other.config) not in layouts:
            layouts.add(kv_layout(other.config))
            per_block += KVCache.block_bytes(other.config, settings.block_size, model.dtype)
    min_blocks = -(-int(config.n_positions) // settings.block_size)
    max_blocks = settings.max_num_seqs * min_blocks
    if settings.num_kv_blocks is not None:
        blocks = blocks_for_budget(
            settings.num_kv_blocks * per_block,
            per_block,
            min_blocks,
            settings.num_kv_blocks,
            "raise --num-kv-blocks",
        )
        return KVSizing(blocks, "num_kv_blocks", per_block)
    if settings.kv_cache_memory_gb is not None:
        # the padded decode's scratch block comes out of the configured size
        budget = int(settings.kv_cache_memory_gb * GIB) - (per_block if decode_graphs else 0)
        hint = "raise --kv-cache-memory-gb"
        blocks = blocks_for_budget(budget, per_block, min_blocks, max_blocks, hint)
        return KVSizing(blocks, "kv_cache_memory_gb", per_block)
    if memory is None and model.device.type == "cuda":
        memory = CudaMemory(model.device)
    if memory is not None:
        return size_from_gpu(
            model,
            memory,
            settings.gpu_memory_utilization,
            per_block,
            settings.max_num_batched_tokens,
            settings.max_num_seqs,
            settings.block_size,
            min_blocks,
            max_blocks,
            decode_graphs,
            more_models,
        )
    budget = int(CPU_DEFAULT_KV_GIB * GIB)
    hint = "raise --kv-cache-memory-gb"
    blocks = blocks_for_budget(budget, per_block, min_blocks, max_blocks, hint)
    return KVSizing(blocks, "cpu_default", per_block)
