"""Paged decode attention in Triton: the GPU counterpart of csrc/paged_attention.c.

Every query row attends to its sequence's first ``context_lens[i]`` positions, reading the
K/V where they lie in the paged cache (docs/ARCHITECTURE.md, "Paged KV cache contract":
position ``p`` in slot ``block_tables[i, p // B] * B + p % B`` of the flat
``[num_blocks * B, H, hd]`` per-layer tensors): no gather buffer, no padding to a context
bucket, no mask. Context lengths are read from a device tensor inside the kernel, so one
launch shape serves every step of a batch size (what a CUDA graph needs).

Split-KV ("flash decoding", as in vLLM's and SGLang's Triton decode kernels), two launches:

1. ``_split_kernel``, one program per (row, head, split): split ``s`` covers positions
   ``[s * SPLIT_TOKENS, (s + 1) * SPLIT_TOKENS)`` of the context, read in tiles of ``TILE``
   positions with an online softmax; it writes its normalized partial output and the log2
   of its softmax denominator (plus max). Splits past the context do nothing.
2. ``_combine_kernel``, one program per (row, head): merges the row's splits in order.

The split boundaries depend on the position only, never on the batch or the launch's split
count, so a row's result is the same in any batch (bit for bit on one device). Arithmetic is
float32 for float32/float16/bfloat16 inputs (float64 for float64, which the CPU tests use
through the interpreter); the output is stored in the output tensor's dtype.

This module imports triton at import time: import it only where triton is importable
(``app/modeling/paged_attention_op.py`` does, lazily). Under ``TRITON_INTERPRET=1`` (set
before this module is imported) the kernels run on CPU tensors through Triton's interpreter,
which is how the CPU test suite checks them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

# Positions per split: every split of every row is one program. 128 keeps a batch-1 decode
# over 1,024 positions at 8 programs per head (96 for GPT-2's 12 heads) while a 256-row
# batch at ~300 positions gets ~9,000 programs; the combine reads 8 partial rows at most.
SPLIT_TOKENS = 128
# Positions per tile inside a split (one masked load of TILE x head_dim keys, then values).
TILE = 64
LOG2E = math.log2(math.e)


# Per-step values (table width, split count) are not specialized on: no recompilation when
# they change between steps.
@triton.jit(do_not_specialize=["table_stride", "part_stride_row", "part_stride_head"])
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    ctx_ptr,
    rows_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,  # softmax scale * log2(e): scores go through exp2
    q_stride_row,
    q_stride_head,
    kv_stride_slot,
    kv_stride_head,
    table_stride,
    part_stride_row,
    part_stride_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    TILE_N: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    ACC: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)
    start = split * SPLIT
    if start < ctx:
        end = tl.minimum(start + SPLIT, ctx)
        row = tl.load(rows_ptr + seq).to(tl.int64) if HAS_ROWS else seq.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + row * q_stride_row + head * q_stride_head + d, mask=d_ok, other=0.0)
        q = q.to(ACC)
        table = tables_ptr + seq.to(tl.int64) * table_stride
        head_off = head * kv_stride_head
        # tl.full, not tl.zeros (a jit'd helper): the interpreter re-patches triton.language
        # on every nested jit call, which dominated the CPU tests' time.
        m = tl.full([], float("-inf"), ACC)
        denom = tl.full([], 0.0, ACC)
        acc = tl.full([BLOCK_D], 0.0, ACC)
        for t0 in range(start, end, TILE_N):
            pos = t0 + tl.arange(0, TILE_N)
            ok = pos < end
            block = tl.load(table + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
            slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
            offs = slot[:, None] * kv_stride_slot + head_off + d[None, :]
            kv_ok = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + offs, mask=kv_ok, other=0.0).to(ACC)
            scores = tl.sum(q[None, :] * k, 1) * scale_log2
            scores = tl.where(ok, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 0))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new)
            v = tl.load(v_ptr + offs, mask=kv_ok, other=0.0).to(ACC)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            denom = denom * alpha + tl.sum(p, 0)
            m = m_new
        part = seq.to(tl.int64) * part_stride_row + head * part_stride_head + split
        tl.store(part_out_ptr + part * HEAD_DIM + d, acc / denom, mask=d_ok)
        tl.store(part_lse_ptr + part, m + tl.log2(denom))


@triton.jit(do_not_specialize=["part_stride_row", "part_stride_head"])
def _combine_kernel(
    part_out_ptr,
    part_lse_ptr,
    ctx_ptr,
    rows_ptr,
    out_ptr,
    out_stride_row,
    out_stride_head,
    part_stride_row,
    part_stride_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    ACC: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)
    row = tl.load(rows_ptr + seq).to(tl.int64) if HAS_ROWS else seq.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    base = seq.to(tl.int64) * part_stride_row + head * part_stride_head
    m = tl.full([], float("-inf"), ACC)
    denom = tl.full([], 0.0, ACC)
    acc = tl.full([BLOCK_D], 0.0, ACC)
    for split in range(0, (ctx + SPLIT - 1) // SPLIT):
        lse = tl.load(part_lse_ptr + base + split)
        part = tl.load(part_out_ptr + (base + split) * HEAD_DIM + d, mask=d_ok, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        weight = tl.exp2(lse - m_new)
        acc = acc * alpha + weight * part
        denom = denom * alpha + weight
        m = m_new
    result = acc / denom
    dst = out_ptr + row * out_stride_row + head * out_stride_head + d
    tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    rows: torch.Tensor | None,
    out: torch.Tensor,
    block_size: int,
    max_context: int,
    scale: float,
) -> None:
    """out[rows[i]] = softmax(q[rows[i]] K_i^T * scale) V_i for each row i, every head
    (rows None: row i itself).

    q/out: [T, H, hd], unit stride along hd (q may be a view of the fused qkv buffer);
    k_cache/v_cache: [slots, H, hd], unit stride along hd; block_tables: [n, width] of
    any integer dtype, at least ceil(context_lens[i] / block_size) ids per row;
    context_lens: [n] integers >= 1; ``max_context``: a bound on them (sets the number of
    splits launched; a larger bound launches splits that exit at once, and changes no
    result). The caller checks shapes and devices (paged_attention_op.py)."""
    n = block_tables.shape[0]
    _, n_head, head_dim = q.shape
    splits = max(1, triton.cdiv(max_context, SPLIT_TOKENS))
    split_meta, combine_meta = _meta(q.dtype, head_dim, block_size, rows is not None)
    part_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    part_out = torch.empty(n, n_head, splits, head_dim, dtype=part_dtype, device=q.device)
    part_lse = torch.empty(n, n_head, splits, dtype=part_dtype, device=q.device)
    rows_arg = rows if rows is not None else context_lens  # never read without rows
    _split_kernel[(n, n_head, splits)](
        q, k_cache, v_cache, block_tables, context_lens, rows_arg, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        n_head * splits, splits,
        **split_meta,
    )  # fmt: skip
    _combine_kernel[(n, n_head)](
        part_out, part_lse, context_lens, rows_arg, out,
        out.stride(0), out.stride(1),
        n_head * splits, splits,
        **combine_meta,
    )  # fmt: skip


def _meta(
    dtype: torch.dtype, head_dim: int, block_size: int, has_rows: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two kernels' compile-time arguments and launch options."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    block_d = triton.next_power_of_2(head_dim)
    common = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "SPLIT": SPLIT_TOKENS}
    common |= {"HAS_ROWS": has_rows, "ACC": acc, "enable_fp_fusion": True}
    split = {**common, "BLOCK_SIZE": block_size, "TILE_N": min(TILE, SPLIT_TOKENS)}
    return split | {"num_warps": 4}, common | {"num_warps": 2}


_POINTER_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


def compile_for(
    target: Any,
    dtype: torch.dtype,
    table_dtype: torch.dtype,
    has_rows: bool,
    head_dim: int = 64,
    block_size: int = 16,
) -> list[Any]:
    """Compile both kernels ahead of time for ``target`` (a ``triton.backends.compiler.
    GPUTarget``; no GPU needed: Triton's bundled ptxas makes the cubin), with the
    compile-time arguments ``paged_decode_attention`` launches them with. Tests use it to
    check the kernels build for a GPU they do not have."""
    from triton.compiler import ASTSource

    split_meta, combine_meta = _meta(dtype, head_dim, block_size, has_rows)
    part = "*fp64" if dtype == torch.float64 else "*fp32"
    ints = _POINTER_TYPES[table_dtype]
    kernels = []
    for fn, meta, pointers, scalars in (
        (
            _split_kernel,
            split_meta,
            {"q_ptr": _POINTER_TYPES[dtype], "k_ptr": _POINTER_TYPES[dtype],
             "v_ptr": _POINTER_TYPES[dtype], "tables_ptr": ints, "ctx_ptr": ints,
             "rows_ptr": "*i64" if has_rows else ints, "part_out_ptr": part,
             "part_lse_ptr": part, "scale_log2": "fp32"},
            ["q_stride_row", "q_stride_head", "kv_stride_slot", "kv_stride_head",
             "table_stride", "part_stride_row", "part_stride_head"],
        ),
        (
            _combine_kernel,
            combine_meta,
            {"part_out_ptr": part, "part_lse_ptr": part, "ctx_ptr": ints,
             "rows_ptr": "*i64" if has_rows else ints, "out_ptr": _POINTER_TYPES[dtype]},
            ["out_stride_row", "out_stride_head", "part_stride_row", "part_stride_head"],
        ),
    ):  # fmt: skip
        options = {k: v for k, v in meta.items() if k in ("num_warps", "enable_fp_fusion")}
        constexprs = {k: v for k, v in meta.items() if k not in options}
        signature = (
            pointers | dict.fromkeys(scalars, "i32") | dict.fromkeys(constexprs, "constexpr")
        )
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernels.append(triton.compile(source, target=target, options=options))
    return kernels
