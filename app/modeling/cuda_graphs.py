"""CUDA graphs of the padded decode step (app/modeling/static_decode.py).

Captured at start-up for a ladder of shapes and replayed by every step that fits one, as vLLM
and nano-vllm do. With the Triton paged attention (CUDA, ``PagedGPT2.decode_kernel() ==
"triton"``) a shape is a batch size: the kernel reads each row's context length from the
static buffer, so one graph per batch size serves every context. Without it (gather + SDPA)
a shape is (batch size, context bucket): the gathered context is padded to the bucket.
Each shape runs once eagerly first (lazy initialization, cuBLAS workspaces, kernel choice and
the Triton kernels' compilation happen outside the capture), then is
captured with ``torch.cuda.graph``. All graphs share one memory pool and are captured largest
first, so a smaller capture reuses what the larger ones freed; that is safe because one graph
runs at a time and nothing in the pool outlives a replay (inputs and logits are static
buffers outside it). Steps off the ladder (prefill or mixed chunks, drafts, more sequences
than the largest batch) run the varlen forward.

Where nothing is captured (``capture`` is CUDA only) ``run`` executes the same padded forward
eagerly: CPU tests check everything here except the capture and replay calls themselves.

SDPA backends: the gather path's attention is one SDPA call, whose kernel torch picks by
heuristics when the call is made, and a graph replays whatever was picked at capture. The
capture (its warm-ups included) and the eager padded forward run under ``decode_sdpa_backends``:
flash, then memory-efficient, then math as the last resort, in that priority (cuDNN's
attention, which recent torch tries first on Hopper, is left out), so the captured kernels
are the ones this list names and an eager step of a shape picks as its graph did. The
context manager sets torch's global backend flags only for these calls; prefill and the
varlen forward keep torch's defaults.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.static_decode import (
    DecodeBuffers,
    DecodeChunk,
    DecodeShape,
    batch_ladder,
    context_buckets,
    decode_forward,
    padded_shape,
)

logger = logging.getLogger("kogpt.engine")

GIB = 2**30
PROGRESS_LINES = 10  # capture progress is logged about this many times
# SDPA kernels the padded decode may use, in priority order (see the module doc).
DECODE_SDPA_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def decode_sdpa_backends() -> AbstractContextManager[object]:
    """The padded decode's SDPA backends pinned (captures and eager padded steps)."""
    return sdpa_kernel(DECODE_SDPA_BACKENDS, set_priority=True)


class DecodeGraphs:
    def __init__(
        self,
        model: PagedGPT2,
        kv: KVCache,
        max_num_seqs: int,
        scratch_block: int,
        batch_sizes: list[int] | None = None,
        context_blocks: list[int] | None = None,
        paged_attention: bool | None = None,
    ) -> None:
        """``scratch_block``: a block of ``kv`` that the block manager never hands out.
        ``batch_sizes`` / ``context_blocks`` override the ladder (tests).
        ``paged_attention``: attend with the in-place Triton kernel, one context bucket
        (default: where the model resolved that kernel)."""
        if not 0 <= scratch_block < kv.num_blocks:
            raise ValueError(
                f"scratch block {scratch_block} is not in a {kv.num_blocks}-block cache"
            )
        self.model, self.kv = model, kv
        self.block_size = kv.block_size
        max_blocks = -(-model.n_positions // kv.block_size)
        if paged_attention is None:
            paged_attention = model.decode_kernel() == "triton"
        self.paged_attention = paged_attention
        self.batch_sizes = sorted(batch_sizes or batch_ladder(max_num_seqs))
        # Paged: every table as wide as the longest context; its unused entries are never read.
        default_buckets = [max_blocks] if paged_attention else context_buckets(max_blocks)
        self.context_blocks = sorted(context_blocks or default_buckets)
        self.buffers = DecodeBuffers(
            model,
            self.batch_sizes[-1],
            self.context_blocks[-1],
            kv.block_size,
            scratch_block,
            paged=paged_attention,
        )
        self.graphs: dict[DecodeShape, torch.cuda.CUDAGraph] = {}
        self.num_padded_steps = 0  # steps run by the padded forward, replayed or eager

    @property
    def shapes(self) -> list[DecodeShape]:
        """Every ladder shape, largest first (the capture order)."""
        return [
            DecodeShape(bs, nb)
            for bs in reversed(self.batch_sizes)
            for nb in reversed(self.context_blocks)
        ]

    def shape_for(self, seqs: Sequence[DecodeChunk]) -> DecodeShape | None:
        """The padded shape of this step, or None when the varlen forward must run it."""
        return padded_shape(
            seqs, self.batch_sizes, self.context_blocks, self.block_size, self.model.n_positions
        )

    def prepare(self, seqs: Sequence[DecodeChunk], shape: DecodeShape) -> list[int]:
        """Copy the step's inputs into the static buffers; returns the sampled rows."""
        return self.buffers.fill(seqs, shape)

    def run(self, shape: DecodeShape, rows: list[int]) -> torch.Tensor:
        """Logits of ``rows`` (from ``prepare``) as a new tensor: the static output is
        rewritten by the next step. No host-device transfer: ``prepare`` copied ``rows`` in
        with the step's inputs."""
        graph = self.graphs.get(shape)
        if graph is None:
            with decode_sdpa_backends():
                logits = decode_forward(self.model, self.kv, self.buffers, shape)
        else:
            graph.replay()
            logits = self.buffers.logits[: shape.batch_size]
        self.num_padded_steps += 1
        if rows == list(range(len(rows))):
            return logits[: len(rows)].clone()
        return logits.index_select(0, self.buffers.sampled_rows[: len(rows)])

    def capture(self) -> None:
        """Capture a graph for every ladder shape (CUDA only), logging progress."""
        device = self.model.device
        if device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, the model is on {device}")
        shapes = self.shapes
        every = max(1, len(shapes) // PROGRESS_LINES)
        started, reserved = time.monotonic(), torch.cuda.memory_reserved(device)
        self.buffers.fill([], shapes[0])  # padding rows only: captures write the scratch block
        # torch.cuda.graph captures on a side stream of the current device: the model's.
        with torch.cuda.device(device), decode_sdpa_backends():
            pool = torch.cuda.graph_pool_handle()
            for done, shape in enumerate(shapes, 1):
                decode_forward(self.model, self.kv, self.buffers, shape)  # warm-up, not captured
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    decode_forward(self.model, self.kv, self.buffers, shape)
                self.graphs[shape] = graph
                if done % every == 0 or done == len(shapes):
                    logger.info(
                        "captured %d/%d decode graphs (batch %d, %d blocks)",
                        done,
                        len(shapes),
                        shape.batch_size,
                        shape.num_blocks,
                    )
        torch.cuda.synchronize(device)
        logger.info(
            "decode graphs for batch sizes %s x context buckets %s blocks captured in %.1fs, "
            "%.2f GiB",
            self.batch_sizes,
            self.context_blocks,
            time.monotonic() - started,
            (torch.cuda.memory_reserved(device) - reserved) / GIB,
        )
