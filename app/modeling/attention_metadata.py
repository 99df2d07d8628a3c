"""One step's model inputs: the scheduler's plain lists turned into tensors, built once.

The scheduler hands out, per sequence, the new tokens to compute this step, how many tokens
of it are already in the KV cache (``start_pos``) and its block table. Everything the forward
needs is derived here, once per step: block tables are the same in every layer, so the 12
(or 24) layers of the forward only index with ready-made tensors.

Attention is split in two kinds of calls (measured on the 2-core CPU with
tests/benchmarks/forward_micro.py):

- single-token chunks (decodes, and 1-token prompts or chunks) are batched: their query is
  one row, so padding contexts to whole blocks (and to the batch's longest) costs a few
  masked key columns, while one call per sequence costs dispatch overhead x sequences x
  layers (per-sequence SDPA measured ~5x slower at 64 sequences). Each batch gathers its
  sequences' blocks (whole blocks: one memcpy per block) and runs one SDPA call. On CPU a
  batch is capped at ``CPU_DECODE_BATCH_TOKENS`` padded keys so the gathered K/V (~1 MB
  each) are still in cache when SDPA reads them; on other devices all decodes form one
  batch. Sequences of very different lengths are sorted into batches of similar length;
- with ``paged_decode=True`` (the native kernel, app/modeling/native.py, or on CUDA the
  Triton one, app/modeling/triton_attention.py) all
  single-token chunks form one ``PagedDecode`` instead: block tables and context lengths,
  no padding, no gather; the kernel reads the blocks in place. Chunks of up to
  ``PAGED_CHUNK_MAX_TOKENS`` tokens join it too, one row per token with its causal context
  (each token's k/v is in the cache before attention): short prompts then cost no SDPA
  call, mask or gather of their own;
- multi-token chunks (prefill) get one call each: padding chunks of different lengths
  together would waste (longest chunk x longest context) work on every shorter chunk, and
  there are only a few of them per step (the token budget bounds their total length). A
  chunk that starts at position 0 attends to its own fresh keys/values with ``is_causal``
  (no gather from the cache at all); a chunk that continues earlier tokens (chunked
  prefill, prefix-cache hit) gathers its context blocks from the cache and uses an
  explicit causal mask offset by ``start_pos``.

KV cache contract (docs/ARCHITECTURE.md): token at position ``p`` of a sequence lives in
slot ``block_table[p // B] * B + p % B`` of the flat ``[num_blocks * B, n_head, head_dim]``
per-layer tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch

from app.modeling.lora import StepLoRA


@dataclass
class SeqChunk:
    """One sequence's work in a step (plain data; ``ScheduledSeq`` has the same fields)."""

    token_ids: list[int]  # the new tokens computed this step
    start_pos: int  # tokens already in the KV cache = position of token_ids[0]
    block_table: list[int]  # block ids covering at least start_pos + len(token_ids) tokens
    sample: bool = True  # logits needed for the last new token
    all_logits: bool = False  # logits needed for every new token (prompt logprobs, tests)


@dataclass
class DecodeBatch:
    """Single-token chunks attended in one batched call over whole-block padded contexts."""

    rows: torch.Tensor  # [n] flat rows of these tokens
    row_slice: slice | None  # the same rows as a slice when contiguous (zero-copy views)
    blocks: torch.Tensor  # [n * nb] block ids, each sequence's table padded with its last block
    num_seqs: int  # n
    num_blocks: int  # nb; the padded context is nb * block_size keys
    first: int  # row of this batch's first sequence in StepInput.decode_mask
    mask: torch.Tensor | None  # [n, 1, 1, nb * B] bool view, True = attend; None: no padding


@dataclass
class PagedDecode:
    """The step's single tokens and short chunks, one row per token, for the native kernel
    (it reads the blocks in place)."""

    rows: torch.Tensor  # [n] int64 flat rows of these tokens
    context_lens: torch.Tensor  # [n] int32, the new token included
    block_tables: torch.Tensor  # [n, width] int32, short tables padded with their last id
    max_context: int


@dataclass
class PrefillChunk:
    """A multi-token chunk: rows [start, end) of the flat batch, attended on its own."""

    start: int
    end: int
    ctx_len: int  # start_pos + (end - start)
    # None when start_pos == 0: the chunk attends to its own fresh k/v with is_causal=True.
    ctx_blocks: torch.Tensor | None  # [ceil(ctx_len / B)] block ids holding positions 0..ctx_len-1
    mask: torch.Tensor | None  # [end - start, ctx_len] bool causal mask offset by start_pos


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [T] int64, all new tokens, sequence after sequence
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, cache slot each new token's k/v is written to
    logits_indices: torch.Tensor  # [R] int64 flat rows whose logits the forward returns
    logits_counts: list[int]  # rows of logits_indices per input sequence (0, 1 or chunk len)
    decode: list[DecodeBatch] = field(default_factory=list)
    # [num decodes, widest batch * B] bool, rows in batch order; DecodeBatch.mask are views
    decode_mask: torch.Tensor | None = None
    paged_decode: PagedDecode | None = None  # instead of ``decode`` when built paged_decode
    prefills: list[PrefillChunk] = field(default_factory=list)
    block_size: int = 16
    num_tokens: int = 0
    max_position: int = -1  # largest position in the step (validated against n_positions)
    # LoRA adapters' rows (app/modeling/lora.py), set by the model runner when a scheduled
    # sequence has an adapter; None: the base model only, no LoRA work at all.
    lora: StepLoRA | None = None


# Keys per decode attention batch on CPU: the gathered K and V of a batch (~1 MB each at
# 768 wide fp32) stay in cache while SDPA reads them, which measured ~35% faster than one
# gather + SDPA over all decodes (tests/benchmarks/forward_micro.py).
CPU_DECODE_BATCH_TOKENS = 384

# Longest chunk attended row by row by the native kernel (paged_decode); longer ones use
# SDPA, whose tiled matmuls do the chunk's n x context work faster than n separate rows.
PAGED_CHUNK_MAX_TOKENS = 64


def _slots(bt_flat: torch.Tensor, bt_off: torch.Tensor, pos: torch.Tensor, block_size: int):
    """Vectorized ``block_table[p // B] * B + p % B`` over a flat concatenation of tables."""
    return bt_flat[bt_off + torch.div(pos, block_size, rounding_mode="floor")] * block_size + (
        pos % block_size
    )


def _group_decodes(n_blocks: list[int], budget: int | None) -> list[list[int]]:
    """Split decodes into batches of at most ``budget`` padded blocks (n * max blocks).

    Greedy in input order; if sorting by length first pads noticeably less (contexts of
    very different lengths), the sorted grouping is used instead.
    """

    def greedy(order: list[int]) -> tuple[list[list[int]], int]:
        groups: list[list[int]] = []
        padded = 0
        cur: list[int] = []
        cur_max = 0
        for j in order:
            m = max(cur_max, n_blocks[j])
            if cur and budget is not None and (len(cur) + 1) * m > budget:
                groups.append(cur)
                padded += len(cur) * cur_max
                cur, m = [], n_blocks[j]
            cur.append(j)
            cur_max = m
        groups.append(cur)
        return groups, padded + len(cur) * cur_max

    order = list(range(len(n_blocks)))
    groups, padded = greedy(order)
    if padded > sum(n_blocks) * 1.1:
        s_groups, s_padded = greedy(sorted(order, key=n_blocks.__getitem__))
        if s_padded < padded * 0.9:
            return s_groups
    return groups


def build_step_input(
    seqs: Sequence[SeqChunk],
    block_size: int,
    device: torch.device | str = "cpu",
    max_positions: int | None = None,
    decode_batch_tokens: int | str = "auto",
    paged_decode: bool = False,
    paged_chunk_tokens: int = PAGED_CHUNK_MAX_TOKENS,
) -> StepInput:
    """Build every tensor of one step. ``seqs`` may be any objects with SeqChunk's fields.

    ``decode_batch_tokens`` caps the padded context (keys) of one decode attention batch:
    "auto" is CPU_DECODE_BATCH_TOKENS on CPU and unbounded elsewhere; <= 0 is unbounded.
    ``paged_decode``: single-token chunks, and chunks of up to ``paged_chunk_tokens`` tokens
    row by row, as one ``PagedDecode`` (the native kernel's input) instead of
    ``DecodeBatch``es and per-chunk SDPA calls.
    Index math runs on CPU (tiny int tensors), then each tensor moves to ``device`` once.
    """
    if not seqs:
        raise ValueError("empty step")
    lens = [len(s.token_ids) for s in seqs]
    starts = [s.start_pos for s in seqs]
    n_blocks = []  # blocks each sequence needs this step
    for s, n, st in zip(seqs, lens, starts, strict=True):
        if n == 0:
            raise ValueError("a scheduled sequence has no new tokens")
        if st < 0:
            raise ValueError(f"negative start_pos {st}")
        need = (st + n + block_size - 1) // block_size
        if len(s.block_table) < need:
            raise ValueError(
                f"block table of {len(s.block_table)} blocks cannot hold {st + n} tokens"
                f" (block_size {block_size})"
            )
        n_blocks.append(need)
    max_position = max(st + n for st, n in zip(starts, lens, strict=True)) - 1
    if max_positions is not None and max_position >= max_positions:
        raise ValueError(f"position {max_position} >= n_positions {max_positions}")

    num_tokens = sum(lens)
    input_ids = torch.tensor(list(chain.from_iterable(s.token_ids for s in seqs)), dtype=torch.long)
    # Only the blocks a step touches; flat tables + offsets avoid padding long tables.
    bt_flat = torch.tensor(
        list(chain.from_iterable(s.block_table[:nb] for s, nb in zip(seqs, n_blocks, strict=True))),
        dtype=torch.long,
    )
    bt_off_list = [0]
    for nb in n_blocks[:-1]:
        bt_off_list.append(bt_off_list[-1] + nb)
    bt_off = torch.tensor(bt_off_list, dtype=torch.long)
    lens_t = torch.tensor(lens, dtype=torch.long)
    starts_t = torch.tensor(starts, dtype=torch.long)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.long)
    torch.cumsum(lens_t, 0, out=cu[1:])

    # Per-token sequence index -> position -> slot, all vectorized.
    seq_idx = torch.repeat_interleave(torch.arange(len(seqs)), lens_t)
    positions = starts_t[seq_idx] + torch.arange(num_tokens) - cu[:-1][seq_idx]
    slot_mapping = _slots(bt_flat, bt_off[seq_idx], positions, block_size)

    logits_rows: list[int] = []
    logits_counts: list[int] = []
    cu_list = cu.tolist()
    for i, s in enumerate(seqs):
        if getattr(s, "all_logits", False):
            logits_rows.extend(range(cu_list[i], cu_list[i + 1]))
            logits_counts.append(lens[i])
        elif s.sample:
            logits_rows.append(cu_list[i + 1] - 1)
            logits_counts.append(1)
        else:
            logits_counts.append(0)

    decode: list[DecodeBatch] = []
    decode_mask = None
    paged = None
    most = max(1, paged_chunk_tokens)  # single tokens always
    paged_idx = [i for i, n in enumerate(lens) if n <= most] if paged_decode else []
    dec_idx = [] if paged_decode else [i for i, n in enumerate(lens) if n == 1]
    if paged_idx:
        width = max(n_blocks[i] for i in paged_idx)
        tables, ctx_lens, rows = [], [], []
        for i in paged_idx:
            table = seqs[i].block_table[: n_blocks[i]]
            table = table + [table[-1]] * (width - len(table))
            for r in range(lens[i]):  # token r (position start + r) sees positions 0..start+r
                tables.append(table)
                ctx_lens.append(starts[i] + r + 1)
                rows.append(cu_list[i] + r)
        paged = PagedDecode(
            rows=torch.tensor(rows, dtype=torch.long).to(device),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32).to(device),
            block_tables=torch.tensor(tables, dtype=torch.int32).to(device),
            max_context=max(ctx_lens),
        )
    elif dec_idx:
        cap = decode_batch_tokens
        if cap == "auto":
            cap = CPU_DECODE_BATCH_TOKENS if torch.device(device).type == "cpu" else 0
        budget = int(cap) // block_size if int(cap) > 0 else None
        groups = _group_decodes([n_blocks[i] for i in dec_idx], budget)
        # One tensor per field for all batches (in batch order), sliced into views per
        # batch: a handful of tensor constructions and device copies per step, not per batch.
        order = [dec_idx[j] for g in groups for j in g]
        ctx = [starts[i] + 1 for i in order]  # the context includes the new token
        rows = [cu_list[i] for i in order]
        blocks: list[int] = []
        widths = []
        for g in groups:
            nb = max(n_blocks[dec_idx[j]] for j in g)
            widths.append(nb)
            for j in g:
                i = dec_idx[j]
                table = seqs[i].block_table
                # Pad with the sequence's own last block: finite data that the mask hides
                # (a masked weight is exactly 0), like the unused tail of its last block.
                blocks.extend(table[: n_blocks[i]])
                blocks.extend([table[n_blocks[i] - 1]] * (nb - n_blocks[i]))
        width = max(widths) * block_size
        decode_mask = (
            torch.arange(width)[None, :] < torch.tensor(ctx, dtype=torch.long)[:, None]
        ).to(device)
        rows_t = torch.tensor(rows, dtype=torch.long).to(device)
        blocks_t = torch.tensor(blocks, dtype=torch.long).to(device)
        a = b_off = 0
        for g, nb in zip(groups, widths, strict=True):
            n = len(g)
            r = rows[a : a + n]
            mask = None
            if min(ctx[a : a + n]) < nb * block_size:  # some context shorter than nb blocks
                mask = decode_mask[a : a + n, : nb * block_size][:, None, None, :]
            decode.append(
                DecodeBatch(
                    rows=rows_t[a : a + n],
                    row_slice=slice(r[0], r[0] + n) if r == list(range(r[0], r[0] + n)) else None,
                    blocks=blocks_t[b_off : b_off + n * nb],
                    num_seqs=n,
                    num_blocks=nb,
                    first=a,
                    mask=mask,
                )
            )
            a += n
            b_off += n * nb

    prefills = []
    in_paged = set(paged_idx)
    for i, n in enumerate(lens):
        if n == 1 or i in in_paged:
            continue
        st = starts[i]
        ctx_len = st + n
        ctx_blocks = mask = None
        if st > 0:
            ctx_blocks = torch.tensor(seqs[i].block_table[: n_blocks[i]], dtype=torch.long)
            # query r (position st + r) sees keys 0..st + r
            mask = torch.arange(ctx_len)[None, :] <= (torch.arange(n) + st)[:, None]
            ctx_blocks, mask = ctx_blocks.to(device), mask.to(device)
        prefills.append(PrefillChunk(cu_list[i], cu_list[i + 1], ctx_len, ctx_blocks, mask))

    return StepInput(
        input_ids=input_ids.to(device),
        positions=positions.to(device),
        slot_mapping=slot_mapping.to(device),
        logits_indices=torch.tensor(logits_rows, dtype=torch.long).to(device),
        logits_counts=logits_counts,
        decode=decode,
        decode_mask=decode_mask,
        paged_decode=paged,
        prefills=prefills,
        block_size=block_size,
        num_tokens=num_tokens,
        max_position=max_position,
    )
