"""Batch-invariant inference: a row's numbers do not depend on the rest of the step.

In batch-invariant mode (``--batch-invariant``, docs/reproducibility.md) every op of a
float32 CPU step computes each token's row with a reduction order that depends only on that
row and its position, never on how many other rows, chunks or sequences the step holds:

- matmuls (every block's four and the LM head): ``RowInvariantLinear`` below;
- attention: every token, prefill chunk or decode, is one row of the native paged kernel
  (app/modeling/csrc/paged_attention.c): one query against its own causal context, the same
  dot-product, softmax and weighted-sum order whatever the chunk or batch. SDPA is not used
  (its tiling follows the chunk length), so a token computed in a 300-token prefill chunk,
  in a 5-token chunk, after a prefix-cache hit, after a preemption's recompute or as a
  decode gets the same K/V and the same hidden state;
- layer norm (torch's CPU kernel normalizes each row on its own), gelu_new (the native
  elementwise pass: no FMA contraction, the same scalar and vector arithmetic), embeddings
  and residual adds (exact per element); the sampler's log_softmax / softmax are per-row
  vector reductions on CPU.

Matmuls. oneDNN and MKL choose their kernel and reduction blocking from the call's shape:
on this machine (Xeon, AVX-512, oneDNN prepacked, torch 2.13) a 1-row call of the 3072 -> 768
MLP projection sums in another order than any call of 2 to 2048 rows (whose rows are all
bit-identical, measured for every GPT-2 shape), and aten's addmm differs between 1 row and
more for every shape. So each call goes to the kernel with at least ``MIN_ROWS`` rows (a
single row is padded) and at most ``BLOCK_MAX_ROWS`` (``HEAD_MAX_ROWS`` for the LM head;
longer inputs are split); at construction ``probe_row_invariance`` checks, for the weight's
shape on this CPU and thread count, that a row's result is the same in calls of every probed
size in that range and at every position of the call, and whether one-row calls give the
same bits too (then they run unpadded: here every shape but the MLP projection); 1-2 s for
kogpt2-base's five shapes, once per process. Where rows differ between call sizes
(another CPU, another library), the linear falls back to fixed tiles: every call has exactly
``FALLBACK_TILE`` rows (the last tile padded), the same shape each time, so the same kernel
and blocking by construction. The pad costs nothing where a step is bound by reading the
weights (one row or two take the same time); the fallback costs up to ``FALLBACK_TILE``
times the arithmetic of a one-row step.

CUDA (bf16/fp16) is not covered by this mode yet: --batch-invariant=on fails there and
auto is off. What a CUDA path needs, following vLLM's batch_invariant.py and SGLang's
deterministic inference (thinking-machines' batch_invariant_ops), is written in
docs/reproducibility.md ("The GPU contract").
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from app.modeling.linear import BlockLinears, GPT2Linears, Linear

logger = logging.getLogger("kogpt.batch_invariant")

BatchInvariant = Literal["auto", "on", "off"]

MIN_ROWS = 2  # a 1-row call sums in another order than calls of 2 rows and more
# Longer inputs are split, so every call stays in the probed range. The blocks' matmuls see
# whole prefill steps (2048 tokens: the default token budget; 8 calls of 256 rows took 1.3x
# one call of 2048 here), the LM head only sampled rows and prompt log-prob slices.
BLOCK_MAX_ROWS = 2048
HEAD_MAX_ROWS = 512
FALLBACK_TILE = 16  # rows of every call where the probe finds the kernel shape-dependent
# build_step_input's paged_chunk_tokens in this mode: every chunk, row by row, in the kernel.
PAGED_ALL_CHUNKS = 1 << 30
# Call sizes the probe compares (2, odd sizes, register-block tails, up to the largest).
PROBE_SIZES = (2, 3, 5, 8, 16, 17, 33, 64, 100, 256, 512, 1000, 2048)


def resolve_batch_invariant(
    setting: str,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str,
    native: bool,
) -> bool:
    """Whether the forward runs batch-invariant: "auto" where it applies (float32 on CPU with
    the native kernels, no int8), "on" requires it (ValueError naming what is missing)."""
    if setting == "off":
        return False
    if setting not in ("auto", "on"):
        raise ValueError(f"batch_invariant must be auto, on or off, not {setting!r}")
    why = None
    if device.type != "cpu" or dtype != torch.float32:
        why = f"it runs float32 on CPU only (not {dtype} on {device.type})"
    elif quantize != "none":
        why = "quantize=int8 scales each call's activations by the whole batch's range"
    elif not native:
        why = "it needs the native kernels (every token's attention as one kernel row)"
    if why is None:
        return True
    if setting == "on":
        raise ValueError(f"batch_invariant=on cannot run: {why}; use batch_invariant=auto/off")
    return False


class RowInvariantLinear:
    """``inner`` (any Linear) called with between MIN_ROWS and ``max_rows`` rows per call
    (``tile`` None), or with exactly ``tile`` rows per call: each output row is then
    computed by the same kernel and blocking whatever the number of input rows."""

    def __init__(
        self,
        inner: Linear,
        in_features: int,
        tile: int | None,
        max_rows: int = BLOCK_MAX_ROWS,
        min_rows: int = MIN_ROWS,
    ) -> None:
        self.inner = inner
        self.in_features = in_features
        self.tile = tile
        self.max_rows = max_rows
        self.min_rows = min_rows  # 1 where the probe found a 1-row call equal too
        self._pad: torch.Tensor | None = None  # reused input rows for short calls

    def _padded(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x [n, K] copied into the first n of ``rows`` reused rows. The other rows keep
        what they hold (zeros, or an earlier call's inputs: finite): a matmul never mixes
        rows, so they cannot change x's results, and not clearing them saves an op per call
        (a one-row decode step makes 49 such calls)."""
        pad = self._pad
        if pad is None or pad.shape[0] < rows or pad.dtype != x.dtype or pad.device != x.device:
            pad = self._pad = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device)
        buf = pad[:rows]
        buf[: x.shape[0]].copy_(x)
        return buf

    def _call(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        n = x.shape[0]
        if n == rows:
            return self.inner(x)
        return self.inner(self._padded(x, rows))[:n]

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if n == 0:
            return self.inner(x, out=out)
        if self.tile is None:
            if self.min_rows <= n <= self.max_rows:
                return self.inner(x, out=out)  # one call of an allowed size: no copy
            if n < self.min_rows:  # a one-row decode step: padded to min_rows
                y = self.inner(self._padded(x, self.min_rows))[:n]
                return y if out is None else out.copy_(y)
        elif n == self.tile:
            return self.inner(x, out=out)
        step = self.tile if self.tile is not None else self.max_rows
        parts = []
        for start in range(0, n, step):
            piece = x[start : start + step]
            rows = self.tile if self.tile is not None else max(piece.shape[0], self.min_rows)
            parts.append(self._call(piece, rows))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        return y if out is None else out.copy_(y)


def probe_row_invariance(
    inner: Linear, in_features: int, dtype: torch.dtype, max_rows: int = BLOCK_MAX_ROWS
) -> int | None:
    """The smallest call size (1 or MIN_ROWS) from which ``inner`` gives every row the same
    bits in calls of every PROBE_SIZES size up to ``max_rows``, or None where it does not
    (random inputs; the reference is one ``max_rows`` call: each call's rows, at every
    position of the call, against the same rows there)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max_rows, in_features, generator=gen, dtype=dtype)
    ref = inner(x)
    sizes = [s for s in PROBE_SIZES if s < max_rows]
    for i, size in enumerate(sizes):
        start = 0 if i % 2 == 0 else (max_rows - size) // 2  # the call's rows sit elsewhere
        if not torch.equal(inner(x[start : start + size]), ref[start : start + size]):
            return None
    # One-row calls: unpadded where they sum like the rest (saves a copy per call).
    for row in (0, max_rows // 2 + 1, max_rows - 1):
        if not torch.equal(inner(x[row : row + 1]), ref[row : row + 1]):
            return MIN_ROWS
    return 1


# Probe results per kernel kind, dtype, shape and thread count: every layer of a model shares
# its shapes, and the tests build many models of the same shapes.
_probed: dict[tuple[str, int, int, int, int], int | None] = {}


def row_invariant(
    inner: Linear,
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    max_rows: int = BLOCK_MAX_ROWS,
) -> Linear:
    """``inner`` wrapped as a RowInvariantLinear, its policy chosen by the (cached) probe."""
    kind = f"{type(inner).__name__} {dtype}"
    key = (kind, in_features, out_features, max_rows, torch.get_num_threads())
    if key not in _probed:
        _probed[key] = probe_row_invariance(inner, in_features, dtype, max_rows)
    min_rows = _probed[key]
    if min_rows is not None:
        return RowInvariantLinear(inner, in_features, None, max_rows, min_rows)
    logger.warning(
        "%s %dx%d: rows differ between call sizes on this CPU; batch-invariant matmuls "
        "run in fixed tiles of %d rows",
        type(inner).__name__,
        in_features,
        out_features,
        FALLBACK_TILE,
    )
    return RowInvariantLinear(inner, in_features, FALLBACK_TILE)


def row_invariant_linears(
    linears: GPT2Linears, blocks: nn.ModuleList, lm_head: nn.Module, dtype: torch.dtype
) -> GPT2Linears:
    """Every matmul of ``linears`` (built from ``blocks`` and ``lm_head``) made row-invariant."""

    def conv1d(inner: Linear, module: nn.Module) -> Linear:
        n_in, n_out = module.weight.shape  # Conv1D's weight is [in, out]
        return row_invariant(inner, n_in, n_out, dtype)

    wrapped = [
        BlockLinears(
            conv1d(lin.qkv, block.attn.c_attn),
            conv1d(lin.attn_proj, block.attn.c_proj),
            conv1d(lin.fc, block.mlp.c_fc),
            conv1d(lin.mlp_proj, block.mlp.c_proj),
        )
        for lin, block in zip(linears.blocks, blocks, strict=True)
    ]
    n_out, n_in = lm_head.weight.shape
    head = row_invariant(linears.lm_head, n_in, n_out, dtype, HEAD_MAX_ROWS)
    return GPT2Linears(wrapped, head, linears.backend)
