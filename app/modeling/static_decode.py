"""The decode step with fixed shapes: what a CUDA graph captures, and runnable eagerly anywhere.

A CUDA graph replays recorded kernels on recorded addresses, so everything a step reads must
sit in buffers allocated once, and every shape must be known when the graph is captured.
This module gives such a step. When every scheduled sequence computes exactly one token, the
batch is padded to a size of ``batch_ladder``; the step's ints are packed into one host
tensor (pinned on CUDA) and copied into ``DecodeBuffers`` with one non-blocking copy (the only
per-step host work; no sync) and ``decode_forward`` runs fixed-shape ops only:

- the new K/V are written with ``index_copy_`` to the slot mapping;
- attention, one of two ways:
  - paged (CUDA with the Triton kernel, ``torch.ops.kogpt.paged_decode_attention``): the
    kernel reads every row's blocks in place, as many positions as the row's context length,
    which it reads from the static buffer. Every table is as wide as the longest context
    (one "bucket"), so there is one shape, and one graph, per batch size;
  - gather (elsewhere): the context is padded to a number of blocks of ``context_buckets``;
    every row's blocks are gathered whole (``index_select`` into a static buffer), an
    additive mask is computed inside from the context lengths (key position < length), and
    one SDPA call attends the whole batch;
  table entries past a sequence's last block name the scratch block;
- ln_f and the LM head run on every row; the caller drops the padding rows' logits.

The scratch block is one KV block past the pool the block manager hands out. Padding rows
write their K/V into it and every padded table entry reads it, so no block a sequence owns
is touched. Its data is always finite (zeros, or the K/V of token 0 at position 0), which
matters: a masked key gets weight exactly 0, but 0 * NaN would still be NaN.

The layers are PagedGPT2's own (``embed``, ``run_layers``, ``head``); only attention differs
from the varlen forward, so logits agree to rounding (float64 tests: < 1e-12).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.paged_attention_op import paged_decode_attention as triton_paged_attention

# vLLM's default largest captured batch: steps with more sequences run the varlen forward.
BATCH_LADDER_LIMIT = 512
# Smallest padded context in blocks (128 keys at block size 16): shorter buckets would
# multiply the graphs for a saving of a few masked keys per row.
SMALLEST_CONTEXT_BUCKET = 8
# Per-row ints of the static input buffer: ids, positions, slots, context lengths, sampled rows.
PER_ROW_INTS = 5


class DecodeChunk(Protocol):
    """What the padded decode reads of a scheduled sequence (ScheduledSeq, SeqChunk)."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool


def batch_ladder(max_num_seqs: int, limit: int = BATCH_LADDER_LIMIT) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, 16, then steps of 16 up to 64, of 32 up to 128 and
    of 64 beyond, ending at min(max_num_seqs, limit). The step grows with the batch, so a
    step pads at most about a third of its rows above 16 while the graphs stay few."""
    top = max(1, min(max_num_seqs, limit))
    sizes: list[int] = []
    bs = 1
    while bs < top:
        sizes.append(bs)
        if bs < 16:
            bs *= 2
        else:
            bs += 16 if bs < 64 else 32 if bs < 128 else 64
    sizes.append(top)
    return sizes


def context_buckets(max_blocks: int, smallest: int = SMALLEST_CONTEXT_BUCKET) -> list[int]:
    """Padded context lengths in blocks: doubling from ``smallest``, ending at ``max_blocks``
    (n_positions in blocks, so every valid decode fits the last bucket)."""
    buckets: list[int] = []
    nb = smallest
    while nb < max_blocks:
        buckets.append(nb)
        nb *= 2
    buckets.append(max(1, max_blocks))
    return buckets


@dataclass(frozen=True)
class DecodeShape:
    batch_size: int  # padded rows
    num_blocks: int  # padded context of every row, in blocks


def padded_shape(
    seqs: Sequence[DecodeChunk],
    batch_sizes: list[int],
    buckets: list[int],
    block_size: int,
    n_positions: int,
) -> DecodeShape | None:
    """The smallest ladder shape that holds this step; None unless every sequence computes
    one valid token and the step fits the ladder (the varlen forward then runs it, and it
    reports invalid input)."""
    if not seqs or len(seqs) > batch_sizes[-1]:
        return None
    need = 0
    for s in seqs:
        if len(s.token_ids) != 1 or not 0 <= s.start_pos < n_positions:
            return None
        blocks = s.start_pos // block_size + 1
        if len(s.block_table) < blocks:
            return None
        need = max(need, blocks)
    nb = next((b for b in buckets if b >= need), None)
    if nb is None:
        return None
    return DecodeShape(next(b for b in batch_sizes if b >= len(seqs)), nb)


def host_staging(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """One step's packed inputs for ``device`` as a host tensor: pinned when that is CUDA, so
    ``copy_(..., non_blocking=True)`` is an asynchronous DMA that neither waits for the
    device nor makes it wait. A fresh pinned block per step from torch's caching host
    allocator, which keeps a block from reuse until the copies recorded on it have completed:
    the next step's packing cannot overwrite a copy still in flight."""
    staged = torch.from_numpy(host)
    return staged.pin_memory() if device.type == "cuda" else staged


class DecodeBuffers:
    """The padded decode's static inputs and output, allocated once at the largest shape.

    The ints live in one tensor (ids | positions | slots | context lengths | sampled rows,
    ``max_batch`` each, then ``bs * nb`` block ids), so a step's inputs reach the device in
    one non-blocking copy from a pinned host tensor (``host_staging``).
    """

    def __init__(
        self,
        model: PagedGPT2,
        max_batch: int,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        paged: bool = False,
    ) -> None:
        """``paged``: attention by the in-place kernel (no gather buffers)."""
        dev, dt = model.device, model.dtype
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.block_size, self.scratch_block = block_size, scratch_block
        self.paged = paged
        self.ints = torch.zeros(
            PER_ROW_INTS * max_batch + max_batch * max_blocks, dtype=torch.long, device=dev
        )
        per_row = self.ints[: PER_ROW_INTS * max_batch].view(PER_ROW_INTS, max_batch)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = per_row[:4]
        # The rows whose logits are sampled (DecodeGraphs.run's gather when some are not).
        self.sampled_rows = per_row[4]
        self.block_ids = self.ints[PER_ROW_INTS * max_batch :]
        self.key_positions = torch.arange(max_blocks * block_size, device=dev)
        row = block_size * model.n_embd  # one block of one layer's keys (B * H * hd)
        gathered = 0 if paged else max_batch * max_blocks
        self.k_gather = torch.empty(gathered, row, dtype=dt, device=dev)
        self.v_gather = torch.empty(gathered, row, dtype=dt, device=dev)
        self.logits = torch.empty(max_batch, model.config.vocab_size, dtype=dt, device=dev)
        self.fill([], DecodeShape(max_batch, max_blocks))  # all padding: capture-safe inputs

    def fill(self, seqs: Sequence[DecodeChunk], shape: DecodeShape) -> list[int]:
        """Copy the step's inputs in (rows past ``len(seqs)`` are padding); returns the rows
        whose logits the step samples. Built in numpy: 1.1 ms against 3.1 ms with Python lists
        for 250 sequences of 64 blocks on the 2-core CPU (build_step_input: 13.9 ms)."""
        bs, nb, B = shape.batch_size, shape.num_blocks, self.block_size
        if len(seqs) > bs or bs > self.max_batch or nb > self.max_blocks:
            raise ValueError(f"{len(seqs)} sequences do not fit {shape}")
        per_row = PER_ROW_INTS * self.max_batch
        host = np.zeros(per_row + bs * nb, dtype=np.int64)
        ids, pos, slots, ctx, sampled = host[:per_row].reshape(PER_ROW_INTS, self.max_batch)
        table = host[per_row:].reshape(bs, nb)
        table.fill(self.scratch_block)  # padded entries and padding rows read the scratch block
        slots[:bs] = self.scratch_block * B  # padding rows write its first slot ...
        ctx[:bs] = 1  # ... and see that one key only
        for i, s in enumerate(seqs):
            p = s.start_pos
            used = p // B + 1
            if used > nb:
                raise ValueError(f"position {p} does not fit {shape}")
            ids[i], pos[i], ctx[i] = s.token_ids[0], p, p + 1
            slots[i] = s.block_table[p // B] * B + p % B
            table[i, :used] = s.block_table[:used]
        rows = [i for i, s in enumerate(seqs) if s.sample]
        sampled[: len(rows)] = rows
        # The step's one host-to-device transfer: asynchronous from pinned memory on CUDA.
        self.ints[: host.size].copy_(host_staging(host, self.ints.device), non_blocking=True)
        return rows


@torch.inference_mode()
def decode_forward(
    model: PagedGPT2, kv: KVCache, bufs: DecodeBuffers, shape: DecodeShape
) -> torch.Tensor:
    """One padded decode step over ``bufs``' inputs; returns ``bufs.logits[:batch_size]``.

    Fixed-shape ops only, no host sync and no data-dependent shapes: a CUDA graph can
    capture it, and replays then compute exactly this.
    """
    bs, nb = shape.batch_size, shape.num_blocks
    E, H, hd, B = model.n_embd, model.n_head, model.head_dim, bufs.block_size
    keys_per_row = nb * B
    slots = bufs.slot_mapping[:bs]
    blocks = bufs.block_ids[: bs * nb]

    qkv = torch.empty(bs, 3 * E, dtype=model.dtype, device=model.device)
    q, k_new, v_new = (t.view(bs, H, hd) for t in qkv.split(E, dim=1))
    out = torch.empty(bs, H, hd, dtype=model.dtype, device=model.device)

    if bufs.paged:
        tables, context_lens = blocks.view(bs, nb), bufs.context_lens[:bs]

        def attend(i: int) -> None:
            k_cache, v_cache = kv.keys[i], kv.values[i]
            k_cache.index_copy_(0, slots, k_new)
            v_cache.index_copy_(0, slots, v_new)
            triton_paged_attention(
                q, k_cache, v_cache, tables, context_lens, None, out, B, keys_per_row, model.scale
            )

    else:
        k_buf, v_buf = bufs.k_gather[: bs * nb], bufs.v_gather[: bs * nb]
        keys = k_buf.view(bs, keys_per_row, H, hd).transpose(1, 2)  # strided view: no copy
        values = v_buf.view(bs, keys_per_row, H, hd).transpose(1, 2)
        visible = bufs.key_positions[:keys_per_row][None, :] < bufs.context_lens[:bs, None]
        mask = torch.zeros(bs, keys_per_row, dtype=model.dtype, device=model.device)
        mask = mask.masked_fill_(~visible, float("-inf"))[:, None, None, :]
        query = q.unsqueeze(2)  # [bs, H, 1, hd]

        def attend(i: int) -> None:
            k_cache, v_cache = kv.keys[i], kv.values[i]
            k_cache.index_copy_(0, slots, k_new)
            v_cache.index_copy_(0, slots, v_new)
            torch.index_select(k_cache.view(-1, B * H * hd), 0, blocks, out=k_buf)
            torch.index_select(v_cache.view(-1, B * H * hd), 0, blocks, out=v_buf)
            o = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=model.scale
            )
            out.copy_(o.squeeze(2))

    hidden = model.embed(bufs.input_ids[:bs], bufs.positions[:bs])
    hidden = model.run_layers(hidden, qkv, out, attend)
    logits = bufs.logits[:bs]
    logits.copy_(model.head(hidden))
    return logits
