"""The native paged decode attention (app/modeling/csrc/paged_attention.c), built on demand.

On a float32 CPU model each layer's decode attention is one call into a small C kernel
that reads every sequence's K/V where it lies in the paged cache, instead of gathering the
blocks into a buffer and running SDPA over the copy (the gather + SDPA took ~40% of a
256-sequence decode step; tests/benchmarks/forward_micro.py).

The kernel is plain C with OpenMP, compiled once per machine with the system C compiler
(``$CC``, default ``cc``; about a second) into a cache directory
(``$KOGPT_NATIVE_CACHE``, default ``$XDG_CACHE_HOME/kogpt-serve`` or
``~/.cache/kogpt-serve``) and loaded with ctypes; no torch headers, no build step at install
time. The file name hashes the source, compiler and flags, so an edited kernel is rebuilt.
It links libgomp, the OpenMP runtime torch's CPU wheel ships and has already loaded: both
share one thread pool. ctypes releases the GIL during the call.

``attention_backend``: "auto" uses the kernel for float32 on CPU when it builds (and logs
why not otherwise), "native" requires it, "torch" never uses it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger("kogpt.native")

AttentionBackend = Literal["auto", "native", "torch"]

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
CFLAGS = ["-O3", "-march=native", "-std=c11", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]


def cache_dir() -> Path:
    explicit = os.environ.get("KOGPT_NATIVE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kogpt-serve"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), version.encode(), " ".join(CFLAGS).encode()])
        + platform.machine().encode()
        + platform.node().encode()  # -march=native: one build per machine
    ).hexdigest()[:16]
    target = cache_dir() / f"paged_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary name, then rename: concurrent builders never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load_kernel() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why it is unavailable). Built and loaded once per process."""
    if platform.system() != "Linux":
        return None, f"the native kernel is built for Linux only (this is {platform.system()})"
    compiler = _compiler()
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')!r} not found)"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"building the native kernel failed: {exc}"
    fn = lib.kogpt_paged_decode_f32
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64]
    fn.argtypes += [i32, i32, i32, i32, ctypes.c_float, i32, i32]
    fn.restype = ctypes.c_int
    return lib, ""


def resolve_attention_backend(
    backend: str, device: torch.device, dtype: torch.dtype
) -> Literal["native", "torch"]:
    """Which decode attention a model on ``device``/``dtype`` runs; ValueError when
    "native" is asked for where it cannot run."""
    if backend == "torch":
        return "torch"
    if backend not in ("auto", "native"):
        raise ValueError(f"attention_backend must be auto, native or torch, not {backend!r}")
    applies = device.type == "cpu" and dtype == torch.float32
    if not applies:
        if backend == "native":
            raise ValueError(
                f"attention_backend=native runs float32 on CPU only (not {dtype} on "
                f"{device.type}); use attention_backend=torch or auto"
            )
        return "torch"
    lib, why = load_kernel()
    if lib is None:
        if backend == "native":
            raise ValueError(f"attention_backend=native is unavailable: {why}")
        logger.warning("decode attention falls back to torch (gather + SDPA): %s", why)
        return "torch"
    return "native"


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    rows: torch.Tensor,
    out: torch.Tensor,
    block_size: int,
    max_context: int,
    scale: float,
) -> None:
    """out[rows[i]] = softmax(q[rows[i]] K_i^T * scale) V_i for every sequence i, each head.

    q and out: [T, H, hd] float32 with contiguous heads (q may be a view of the fused qkv
    buffer); k_cache/v_cache: [slots, H, hd] contiguous; block_tables: [n, width] int32
    (row i holds at least ceil(context_lens[i] / block_size) ids); context_lens: [n] int32;
    rows: [n] int64. The caller guarantees shapes and dtypes (PagedGPT2 builds them)."""
    lib, why = load_kernel()
    if lib is None:
        raise RuntimeError(why)
    _, H, hd = q.shape
    rc = lib.kogpt_paged_decode_f32(
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        context_lens.data_ptr(),
        rows.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        rows.shape[0],
        H,
        hd,
        block_size,
        scale,
        max_context,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("native paged attention could not allocate its score buffers")
