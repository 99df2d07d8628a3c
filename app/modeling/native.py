"""The native CPU kernels (app/modeling/csrc/), built on demand, and their Python wrappers.

On a float32 CPU model two parts of the forward run as small C kernels:
- decode attention (paged_attention.c): one call per layer reads every sequence's K/V where
  it lies in the paged cache, instead of gathering the blocks into a buffer and running SDPA
  over the copy (the gather + SDPA took ~40% of a 256-sequence decode step at context 200;
  tests/benchmarks/forward_micro.py);
- gelu_new (gelu.c): one pass instead of torch's five elementwise ones.

The kernels are plain C with OpenMP, compiled once per machine with the system C compiler
(``$CC``, default ``cc``; about a second) into a cache directory
(``$KOGPT_NATIVE_CACHE``, default ``$XDG_CACHE_HOME/kogpt-serve`` or
``~/.cache/kogpt-serve``) into one library loaded with ctypes; no torch headers, no build
step at install time. The file name hashes the sources, compiler and flags, so an edited
kernel is rebuilt.
It links libgomp, the OpenMP runtime torch's CPU wheel ships and has already loaded: both
share one thread pool. ctypes releases the GIL during the call.

``native_kernels``: "auto" uses them for float32 on CPU when they build (and logs why not
otherwise), "on" requires them, "off" never uses them (torch ops only).
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

NativeKernels = Literal["auto", "on", "off"]

CSRC = Path(__file__).parent / "csrc"
# -fno-math-errno -fno-trapping-math: floorf and the clamps in fast_exp.h vectorize only
# without errno and FP-exception semantics (gcc 12); the compiler's own vector width for
# -march=native (128-bit on this AMD CPU) measured faster than forcing 256-bit.
CFLAGS = ["-O3", "-march=native", "-std=c11", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
CFLAGS += ["-fPIC", "-shared"]


def cache_dir() -> Path:
    explicit = os.environ.get("KOGPT_NATIVE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kogpt-serve"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


def _build(compiler: str) -> Path:
    files = [*sources(), *sorted(CSRC.glob("*.h"))]
    source = b"\0".join(f.name.encode() + b"\0" + f.read_bytes() for f in files)
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), version.encode(), " ".join(CFLAGS).encode()])
        + platform.machine().encode()
        + platform.node().encode()  # -march=native: one build per machine
    ).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary name, then rename: concurrent builders never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *CFLAGS, f"-I{CSRC}", *map(str, sources()), "-o", tmp, "-lm"],
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
def load_kernels() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why it is unavailable). Built and loaded once per process."""
    if platform.system() != "Linux":
        return None, f"the native kernels are built for Linux only (this is {platform.system()})"
    compiler = _compiler()
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')!r} not found)"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"building the native kernels failed: {exc}"
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    attention = lib.kogpt_paged_decode_f32
    attention.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64]
    attention.argtypes += [i32, i32, i32, i32, ctypes.c_float, i32, i32]
    attention.restype = ctypes.c_int
    lib.kogpt_gelu_new_f32.argtypes = [ptr, i64, i32]
    lib.kogpt_gelu_new_f32.restype = None
    return lib, ""


def resolve_native_kernels(setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on ``device``/``dtype`` runs the native kernels; ValueError when
    "on" is asked for where they cannot run."""
    if setting == "off":
        return False
    if setting not in ("auto", "on"):
        raise ValueError(f"native_kernels must be auto, on or off, not {setting!r}")
    if device.type != "cpu" or dtype != torch.float32:
        if setting == "on":
            raise ValueError(
                f"native_kernels=on runs float32 on CPU only (not {dtype} on "
                f"{device.type}); use native_kernels=auto or off"
            )
        return False
    lib, why = load_kernels()
    if lib is None:
        if setting == "on":
            raise ValueError(f"native_kernels=on, but they are unavailable: {why}")
        logger.warning("native kernels off, torch ops only (gather + SDPA attention): %s", why)
        return False
    return True


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
    lib, why = load_kernels()
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


def gelu_new_(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new in place on a contiguous float32 CPU tensor; returns it."""
    lib, why = load_kernels()
    if lib is None:
        raise RuntimeError(why)
    if not x.is_contiguous() or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("gelu_new_ needs a contiguous float32 CPU tensor")
    lib.kogpt_gelu_new_f32(x.data_ptr(), x.numel(), torch.get_num_threads())
    return x
