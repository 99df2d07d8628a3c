"""Owns the KV tensors and the paged model; turns a SchedulerOutput into logits."""

from __future__ import annotations

import torch

from app.engine.scheduler import SchedulerOutput
from app.modeling.attention_metadata import build_step_input
from app.modeling.gpt2 import KVCache, PagedGPT2
from app.modeling.linear import LinearBackend


class ModelRunner:
    def __init__(
        self,
        hf_model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        linear_backend: LinearBackend = "auto",
    ) -> None:
        self.config = hf_model.config
        self.hf_model = hf_model  # kept for transformers-side preparation (beam search)
        self.model = PagedGPT2.from_hf(hf_model, linear_backend)
        self.model.linears()  # packs weights now: a bad backend fails at start-up, not per step
        self.device = next(hf_model.parameters()).device
        self.dtype = self.model.dtype
        self.block_size = block_size
        self.kv_cache = KVCache.allocate(
            self.config, num_blocks, block_size, self.dtype, self.device
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits [num sampling seqs, vocab], rows in the order of `out.seqs` that sample."""
        self.kv_cache.copy_blocks(out.cow_copies)
        step = build_step_input(
            out.seqs, self.block_size, self.device, max_positions=self.config.n_positions
        )
        return self.model(step, self.kv_cache)
