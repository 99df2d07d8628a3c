"""KV pool sizing: explicit settings, the CPU default, and the GPU profile's arithmetic.

The GPU path's memory calls go through a `DeviceMemory`; here a fake one reports fixed
numbers while the profiling step itself really runs (on CPU) over the tiny model.
"""

from __future__ import annotations

import pytest
from transformers import GPT2LMHeadModel

from app.config import Settings
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.kv_sizing import (
    CPU_DEFAULT_KV_GIB,
    GIB,
    KVSizingError,
    profile_step_seqs,
    resolve_kv_sizing,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeMemory:
    def __init__(self, total: int, free: int, reserved: int, allocated: int, peak: int) -> None:
        self.total, self.free, self.reserved = total, free, reserved
        self.allocated, self.peak = allocated, peak
        self.resets = 0

    def mem_get_info(self) -> tuple[int, int]:
        return self.free, self.total

    def memory_allocated(self) -> int:
        return self.allocated

    def memory_reserved(self) -> int:
        return self.reserved

    def max_memory_allocated(self) -> int:
        return self.peak

    def reset_peak(self) -> None:
        self.resets += 1


def settings(**kw: object) -> Settings:
    return Settings(**{"block_size": 16, "max_num_seqs": 8, "max_num_batched_tokens": 256, **kw})


def per_block(model: GPT2LMHeadModel) -> int:
    return KVCache.block_bytes(model.config, 16, model.dtype)


def test_explicit_blocks_and_memory(tiny_model: GPT2LMHeadModel) -> None:
    paged = PagedGPT2.from_hf(tiny_model)
    assert resolve_kv_sizing(settings(num_kv_blocks=40), paged).num_blocks == 40
    gb = 20 * per_block(tiny_model) / GIB
    sized = resolve_kv_sizing(settings(kv_cache_memory_gb=gb), paged)
    assert (sized.num_blocks, sized.source) == (20, "kv_cache_memory_gb")
    with pytest.raises(KVSizingError, match="--num-kv-blocks"):
        resolve_kv_sizing(settings(num_kv_blocks=3), paged)  # 128 positions need 8 blocks


def test_draft_model_kv_is_counted_per_block(tiny_model: GPT2LMHeadModel) -> None:
    """With --draft-model both caches hold every block: a block costs both models' bytes."""
    paged = PagedGPT2.from_hf(tiny_model)
    draft_config = tiny_model.config.__class__(**{**tiny_model.config.to_dict(), "n_layer": 1})
    draft_block = KVCache.block_bytes(draft_config, 16, tiny_model.dtype)
    assert 0 < draft_block < per_block(tiny_model)
    gb = 20 * per_block(tiny_model) / GIB
    sized = resolve_kv_sizing(settings(kv_cache_memory_gb=gb), paged, draft_config=draft_config)
    assert sized.bytes_per_block == per_block(tiny_model) + draft_block
    assert sized.num_blocks == int(gb * GIB) // (per_block(tiny_model) + draft_block) < 20
    explicit = resolve_kv_sizing(settings(num_kv_blocks=40), paged, draft_config=draft_config)
    assert (explicit.num_blocks, explicit.bytes_per_block) == (40, sized.bytes_per_block)


def test_cpu_default_is_capped_by_full_length_sequences(tiny_model: GPT2LMHeadModel) -> None:
    sized = resolve_kv_sizing(settings(), PagedGPT2.from_hf(tiny_model))
    full = 8 * (128 // 16)  # max_num_seqs full-length sequences
    assert sized.source == "cpu_default"
    assert sized.num_blocks == min(full, int(CPU_DEFAULT_KV_GIB * GIB) // per_block(tiny_model))


def test_gpu_budget_subtracts_weights_activations_and_outside_memory(
    tiny_model: GPT2LMHeadModel,
) -> None:
    block = per_block(tiny_model)
    weights, activation, outside = 100 * block, 30 * block, 50 * block
    total = 400 * block
    memory = FakeMemory(
        total=total,
        free=total - outside - 200 * block,  # torch reserved 200 blocks' worth
        reserved=200 * block,
        allocated=weights,
        peak=weights + activation,
    )
    s = settings(gpu_memory_utilization=0.5, max_num_seqs=1000)
    sized = resolve_kv_sizing(s, PagedGPT2.from_hf(tiny_model), memory)
    assert sized.source == "gpu_memory_utilization"
    assert sized.activation_peak == activation
    assert sized.non_torch == outside
    assert sized.num_blocks == (200 * block - weights - activation - outside) // block == 20
    assert memory.resets >= 1
    assert "GPU" in sized.describe() and sized.as_dict()["num_blocks"] == 20


def test_gpu_budget_too_small_names_the_settings(tiny_model: GPT2LMHeadModel) -> None:
    block = per_block(tiny_model)
    memory = FakeMemory(400 * block, 400 * block, 0, 100 * block, 180 * block)
    with pytest.raises(KVSizingError, match=r"--gpu-memory-utilization.*--max-num-batched-tokens"):
        resolve_kv_sizing(
            settings(gpu_memory_utilization=0.45), PagedGPT2.from_hf(tiny_model), memory
        )


@pytest.mark.parametrize(("tokens", "seqs"), [(256, 8), (2048, 256), (300, 1), (5, 64)])
def test_profile_step_covers_the_largest_batch(tokens: int, seqs: int) -> None:
    chunks = profile_step_seqs(tokens, seqs, n_positions=128, block_size=16)
    assert sum(len(c.token_ids) for c in chunks) == tokens
    assert all(len(c.token_ids) < 128 for c in chunks)
    blocks = [b for c in chunks for b in c.block_table]
    assert sorted(blocks) == list(range(len(blocks)))  # disjoint, dense
    assert all(len(c.block_table) * 16 >= len(c.token_ids) for c in chunks)


def test_decode_graphs_and_scratch_block_come_out_of_the_budget(
    tiny_model: GPT2LMHeadModel,
) -> None:
    block = per_block(tiny_model)
    weights, activation, outside, total = 100 * block, 30 * block, 50 * block, 600 * block
    memory = FakeMemory(
        total, total - outside - 200 * block, 200 * block, weights, weights + activation
    )
    s = settings(gpu_memory_utilization=0.5, max_num_seqs=1000)
    paged = PagedGPT2.from_hf(tiny_model)
    plain = resolve_kv_sizing(s, paged, memory)  # a CPU model: no graphs unless asked
    assert plain.decode_graphs is None and plain.num_blocks == 300 - 100 - 30 - 50
    graphs = resolve_kv_sizing(s, paged, memory, decode_graphs=True)
    # The fake reports one peak for every profile: the graphs' profile reads as `activation`
    # (their buffers, the scratch block and the largest padded step, beyond the weights).
    assert graphs.decode_graphs == activation
    assert graphs.num_blocks == plain.num_blocks - 30
    assert "decode graphs" in graphs.describe()
    with pytest.raises(KVSizingError, match="--enforce-eager"):
        resolve_kv_sizing(settings(gpu_memory_utilization=0.3), paged, memory, decode_graphs=True)
    gb = 20 * block / GIB
    sized = resolve_kv_sizing(settings(kv_cache_memory_gb=gb), paged, decode_graphs=True)
    assert sized.num_blocks == 19  # the scratch block is inside the configured size
