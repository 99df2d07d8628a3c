"""Owns the KV tensors and the paged model; turns a SchedulerOutput into logits.

All-decode steps that fit the CUDA-graph ladder run the padded decode (replayed graphs on
CUDA, app/modeling/cuda_graphs.py); every other step runs the varlen forward.
"""

from __future__ import annotations

import torch

from app.engine.core.scheduler import SchedulerOutput
from app.engine.step_timing import StepTimer
from app.modeling.attention_metadata import build_step_input
from app.modeling.cuda_graphs import DecodeGraphs
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.linear import LinearBackend, Quantize
from app.modeling.native import NativeKernels


class ModelRunner:
    def __init__(
        self,
        hf_model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        linear_backend: LinearBackend = "auto",
        *,
        quantize: Quantize = "none",
        max_num_seqs: int = 256,
        enforce_eager: bool = False,
        static_decode: bool | None = None,
        native_kernels: NativeKernels = "auto",
    ) -> None:
        """``enforce_eager``: never capture CUDA graphs. ``static_decode``: run all-decode
        steps through the padded fixed-shape forward (default: where graphs are captured,
        i.e. on CUDA unless ``enforce_eager``); True without graphs runs it eagerly (tests)."""
        self.config = hf_model.config
        self.hf_model = hf_model  # kept for transformers-side preparation (beam search)
        self.model = PagedGPT2.from_hf(hf_model, linear_backend, quantize, native_kernels)
        # Packs weights and builds the native kernels now: a bad backend fails at start-up.
        self.model.linears()
        self.model.uses_native()
        self.device = next(hf_model.parameters()).device
        self.dtype = self.model.dtype
        self.block_size = block_size
        capture = self.device.type == "cuda" and not enforce_eager
        padded = capture if static_decode is None else static_decode
        # The padded decode needs one scratch block that the block manager never hands out:
        # block `num_blocks`, past the managed pool.
        self.kv_cache = KVCache.allocate(
            self.config, num_blocks + int(padded), block_size, self.dtype, self.device
        )
        self.step_timer = StepTimer(self.device)
        self.decode_graphs: DecodeGraphs | None = None
        if padded:
            self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, max_num_seqs, num_blocks)
            if capture:
                self.decode_graphs.capture()

    @property
    def num_decode_graphs(self) -> int:
        """CUDA graphs captured for decode steps (0 on CPU or with enforce_eager)."""
        return len(self.decode_graphs.graphs) if self.decode_graphs is not None else 0

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits [num sampling seqs, vocab], rows in the order of `out.seqs` that sample."""
        self.kv_cache.copy_blocks(out.cow_copies)
        graphs = self.decode_graphs
        shape = graphs.shape_for(out.seqs) if graphs is not None else None
        if graphs is not None and shape is not None:
            rows = graphs.prepare(out.seqs, shape)
            self.step_timer.forward_started()
            logits = graphs.run(shape, rows)
        else:
            step = build_step_input(
                out.seqs,
                self.block_size,
                self.device,
                max_positions=self.config.n_positions,
                paged_decode=self.model.paged_decode,
            )
            self.step_timer.forward_started()
            logits = self.model(step, self.kv_cache)
        self.step_timer.forward_finished()
        return logits
