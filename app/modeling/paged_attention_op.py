"""``torch.ops.kogpt.paged_decode_attention``: the Triton paged decode kernel as a torch op.

The kernel (app/modeling/triton_attention.py) is registered as a custom op, as vLLM and
SGLang register theirs, so that:

- under ``FakeTensorMode`` (tests/unit/fake_cuda.py: "cuda" tensors on a CPU-only build) the
  op runs its fake implementation: the forward's tensor plumbing around the kernel (shapes,
  dtypes, devices of every argument) is checked without a GPU or even triton;
- CUDA graph capture and torch.compile see one opaque op that mutates ``out`` only.

This module does not import triton: the kernel module is imported on the first real call,
and ``triton_available()`` says whether that can work here. The model uses the op on CUDA
(``PagedGPT2.decode_kernel``); the CPU keeps its C kernel (app/modeling/native.py).
"""

import contextlib
import functools
import importlib

import torch

_KERNEL_MODULE = "app.modeling.triton_attention"
_KINDS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def triton_available() -> tuple[bool, str]:
    """(True, "") or (False, why triton cannot be imported). Checked once per process."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # an absent or broken install: the caller falls back, logged
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, ""


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    rows: torch.Tensor | None,
    out: torch.Tensor,
    block_size: int,
) -> None:
    # What the kernel assumes and cannot check itself (it reads raw pointers); checked in the
    # fake implementation too, so device-placement tests catch a misplaced argument.
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables}
    tensors |= {"context_lens": context_lens, "out": out}
    if rows is not None:
        tensors["rows"] = rows
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"paged_decode_attention: {name} is on {t.device}, q on {q.device}")
    if q.dim() != 3 or out.shape != q.shape or k_cache.dim() != 3:
        raise ValueError(
            f"paged_decode_attention: q {tuple(q.shape)}, out {tuple(out.shape)} and k_cache "
            f"{tuple(k_cache.shape)} must be [rows, H, hd] with the same H and hd"
        )
    if k_cache.shape[1:] != q.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"paged_decode_attention: k_cache {tuple(k_cache.shape)} and v_cache "
            f"{tuple(v_cache.shape)} do not match q {tuple(q.shape)}"
        )
    if v_cache.stride() != k_cache.stride():
        raise ValueError("paged_decode_attention: k_cache and v_cache strides differ")
    if any(t.stride(-1) != 1 for t in (q, out, k_cache)):
        raise ValueError("paged_decode_attention: q, out and the caches need unit stride in hd")
    if q.dtype not in _KINDS or {out.dtype, k_cache.dtype, v_cache.dtype} != {q.dtype}:
        raise ValueError(
            f"paged_decode_attention: q {q.dtype}, out {out.dtype}, caches {k_cache.dtype}/"
            f"{v_cache.dtype}: one floating dtype of {_KINDS}"
        )
    n = block_tables.shape[0]
    if block_tables.dim() != 2 or context_lens.shape != (n,):
        raise ValueError(
            f"paged_decode_attention: block_tables {tuple(block_tables.shape)} must be "
            f"[n, width] and context_lens {tuple(context_lens.shape)} [n]"
        )
    if rows is None and n > q.shape[0]:
        raise ValueError(f"paged_decode_attention: {n} tables for {q.shape[0]} query rows")
    if rows is not None and rows.shape != (n,):
        raise ValueError(f"paged_decode_attention: rows {tuple(rows.shape)} must be [{n}]")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"paged_decode_attention: block_size {block_size} is not a power of 2")


@torch.library.custom_op("kogpt::paged_decode_attention", mutates_args=("out",))
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
    """out[rows[i]] = softmax(q[rows[i]] K_i^T * scale) V_i over the first context_lens[i]
    positions of row i's block table, every head; rows None: row i itself (see
    triton_attention.paged_decode_attention for the layouts)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, rows, out, block_size)
    if block_tables.shape[0] == 0:
        return
    ok, why = triton_available()
    if not ok:
        raise RuntimeError(f"the Triton paged attention kernel cannot run: {why}")
    kernels = importlib.import_module(_KERNEL_MODULE)
    # Triton launches on the thread's current CUDA device, not the tensors' (torch ops guard
    # their own): the engine thread's is device 0 whatever --device cuda:N made current on
    # the thread that loaded the model.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        kernels.paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, rows, out, block_size,
            max_context, scale,
        )  # fmt: skip


@paged_decode_attention.register_fake
def _(
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
    _check(q, k_cache, v_cache, block_tables, context_lens, rows, out, block_size)
