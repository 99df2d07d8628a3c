"""The matmuls of the paged GPT-2 forward: the same ``x W + b`` by one of a few backends.

- ``aten``: HF's own op (Conv1D is ``addmm(bias, x, W)``, the LM head ``F.linear``) on the
  model's tensors: no copy, bit-identical to GPT2LMHeadModel. Every dtype and device.
- ``mkldnn``: float32 on CPU, the weights prepacked once into oneDNN's blocked layout and
  run by ``torch.ops.mkldnn._linear_pointwise`` (what torch.compile's CPU freezing pass
  emits). On the 2-core AVX2 machine a decode step's matmuls at 64 sequences took 241 ms
  against 337 ms with aten, and the LM head alone 73 ms against 129 ms (packed for 64 rows,
  used at any row count; tests/benchmarks/linear_micro.py). Results differ from aten by
  float32 rounding only (summation order). Costs one extra copy of the linear weights.
- ``int8`` (``quantize="int8"``, float32 on CPU only; see ``Int8Dynamic``): every matmul,
  the LM head included, in dynamic int8 by fbgemm: weights quantized once per output
  channel, activations per call, float32 in and out. Lossy: on models/kogpt2-mini the
  perplexity of held-out text moved by 0.15% (tests/benchmarks/int8_quality.py). Costs a
  quarter of the linear weights' size; the float weights stay (embeddings, exact lane).

Whether the LM head (51200 x 768 on kogpt2-base, tied to wte) is quantized too was decided
by tests/benchmarks/linear_micro.py (12 layers' matmuls, then the head; 1 thread, AVX2,
best of 5): at 1 / 16 / 64 rows the blocks took 40.2 / 106.3 / 329.4 ms in mkldnn against
10.9 / 78.2 / 305.2 ms in int8, the head 13.1 / 43.6 / 141.6 against 3.4 / 34.3 / 137.5
ms. From 64 to 256 rows, repeated runs put int8 between 0.86x and 1.06x of mkldnn's
speed on the head (even, within this shared machine's noise) and 1.02x to 1.4x on the
blocks. int8 wins where a step is bound by reading weights (few rows), little where it is
bound by arithmetic: fbgemm's AVX2 int8 kernel (u8 x s8 multiply-add into int16 pairs) is
not much faster than float32 FMA. The int8 head also takes 39 MB where mkldnn's packed
copy takes 157 MB. Quality barely moved: with the head left in float32 (a one-off
run of int8_quality.py with the head swapped back) held-out perplexity moved by 0.13%
instead of 0.15%, mean |d log p| 0.046 instead of 0.049 nats. So the head is quantized,
as CTranslate2's int8 does.

``resolve_linear_backend("auto", ...)`` picks mkldnn where it applies, aten elsewhere.

oneDNN and MKL choose their blocking from the call's shape, so a row's bits can depend on how
many rows share the call (here: a 1-row call of the 3072 -> 768 projection). In
batch-invariant mode each of these linears is wrapped by app/modeling/batch_invariant.py's
``RowInvariantLinear`` (call sizes kept in a probed range, or fixed tiles).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

LinearBackend = Literal["auto", "aten", "mkldnn"]
Quantize = Literal["none", "int8"]

# Row count oneDNN's packed layout is tuned for: the decode batch of a busy server. Any row
# count works with it (tests/unit/test_linear.py); at 1-256 rows it measured faster than aten.
MKLDNN_PACK_ROWS = 64


class Linear(Protocol):
    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...


class AtenConv1D:
    """HF Conv1D: ``addmm(bias, x, weight)`` with weight [in, out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return torch.addmm(self.bias, x, self.weight)
        return torch.addmm(self.bias, x, self.weight, out=out)


class AtenHead:
    """nn.Linear without bias, weight [out, in] (the LM head, tied to wte)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return y if out is None else out.copy_(y)


class MkldnnPacked:
    """oneDNN linear on a prepacked copy of weight [out, in] (float32, CPU)."""

    def __init__(self, weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight_out_in.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, MKLDNN_PACK_ROWS)
        self.bias = None if bias is None else bias.detach()
        self.out_features = w.shape[0]

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y if out is None else out.copy_(y)


class Int8Dynamic:
    """Dynamic int8 linear (fbgemm): weight [out, in] quantized once per output channel
    (qint8, symmetric, scale = max |w| / 127), activations quantized per call (per tensor,
    7-bit: ``reduce_range``), int32 accumulation, float32 in and out, float32 bias.

    The op and arguments of ``torch.ao.nn.quantized.dynamic.Linear`` (version 4). Without
    reduce_range, AVX2's u8 x s8 multiply-add saturates its int16 pair sums: on this machine
    random 64 x 768 inputs then erred 3-5x more (max error / max |y|: ~0.09 against ~0.02).
    """

    def __init__(self, weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight_out_in.detach().to(torch.float32).contiguous()
        # An all-zero channel (pruned) still needs a positive scale; its int8 row is zero.
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).to(torch.float64)
        zero_points = torch.zeros(w.shape[0], dtype=torch.long)
        with _fbgemm_engine(), warnings.catch_warnings():
            # torch marks quantized tensor creation deprecated (pytorch#184982); the
            # quantized linear ops below are its only input format, nothing to act on here.
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
            qweight = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
            b = None if bias is None else bias.detach().to(torch.float32).contiguous()
            self.packed = torch.ops.quantized.linear_prepack(qweight, b)
        self.out_features = w.shape[0]

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True)
        return y if out is None else out.copy_(y)


@contextmanager
def _fbgemm_engine() -> Iterator[None]:
    """linear_prepack packs for the current quantized engine; pack for fbgemm, then restore."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


@dataclass
class BlockLinears:
    qkv: Linear  # attn.c_attn
    attn_proj: Linear  # attn.c_proj
    fc: Linear  # mlp.c_fc
    mlp_proj: Linear  # mlp.c_proj


@dataclass
class GPT2Linears:
    blocks: list[BlockLinears]
    lm_head: Linear
    backend: str  # what runs: "aten", "mkldnn" or "int8-fbgemm"


def mkldnn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


def resolve_linear_backend(
    backend: LinearBackend, device: torch.device, dtype: torch.dtype
) -> Literal["aten", "mkldnn"]:
    """The backend to run: "auto" is mkldnn for float32 on CPU when oneDNN is built in."""
    fits = device.type == "cpu" and dtype == torch.float32 and mkldnn_available()
    if backend == "mkldnn":
        if not fits:
            raise ValueError(
                f"linear backend mkldnn needs float32 on CPU with oneDNN (got {dtype} on "
                f"{device.type}); use linear_backend=aten or auto"
            )
        return "mkldnn"
    if backend == "aten":
        return "aten"
    if backend == "auto":
        return "mkldnn" if fits else "aten"
    raise ValueError(f"linear_backend must be auto, aten or mkldnn, not {backend!r}")


def int8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def check_quantize(quantize: Quantize, device: torch.device, dtype: torch.dtype) -> None:
    """Raise (naming the setting) unless ``quantize`` applies to this device and dtype."""
    if quantize == "none":
        return
    if quantize != "int8":
        raise ValueError(f"quantize must be none or int8, not {quantize!r}")
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(
            f"quantize=int8 needs float32 on CPU (got {dtype} on {device.type}); use "
            "--device cpu with --dtype float32 or auto, or quantize=none"
        )
    if not int8_available():
        raise ValueError("quantize=int8 needs torch built with fbgemm; use quantize=none")


def build_linears(
    blocks: nn.ModuleList,
    lm_head: nn.Module,
    backend: LinearBackend,
    device,
    dtype,
    quantize: Quantize = "none",
) -> GPT2Linears:
    """The matmuls of every block and the LM head, for the resolved backend; with
    quantize=int8 every one of them is int8 (``backend`` then only has to be valid)."""
    chosen = resolve_linear_backend(backend, torch.device(device), dtype)
    check_quantize(quantize, torch.device(device), dtype)
    if quantize == "int8":
        return GPT2Linears(
            [
                BlockLinears(*(Int8Dynamic(m.weight.t(), m.bias) for m in _conv1ds(b)))
                for b in blocks
            ],
            Int8Dynamic(lm_head.weight, None),
            "int8-fbgemm",
        )

    def conv1d(module: nn.Module) -> Linear:
        if chosen == "mkldnn":  # Conv1D's weight is [in, out]; oneDNN takes [out, in]
            return MkldnnPacked(module.weight.t(), module.bias)
        return AtenConv1D(module.weight, module.bias)

    layers = [BlockLinears(*(conv1d(m) for m in _conv1ds(b))) for b in blocks]
    head = MkldnnPacked(lm_head.weight, None) if chosen == "mkldnn" else AtenHead(lm_head.weight)
    return GPT2Linears(layers, head, chosen)


def _conv1ds(block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """A GPT-2 block's Conv1D modules in BlockLinears' field order."""
    return block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj
