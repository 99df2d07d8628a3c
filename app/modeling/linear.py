"""The matmuls of the paged GPT-2 forward: the same ``x W + b`` by one of a few backends.

- ``aten``: HF's own op (Conv1D is ``addmm(bias, x, W)``, the LM head ``F.linear``) on the
  model's tensors: no copy, bit-identical to GPT2LMHeadModel. Every dtype and device.
- ``mkldnn``: float32 on CPU, the weights prepacked once into oneDNN's blocked layout and
  run by ``torch.ops.mkldnn._linear_pointwise`` (what torch.compile's CPU freezing pass
  emits). On the 2-core AVX2 machine a decode step's matmuls at 64 sequences took 241 ms
  against 337 ms with aten, and the LM head alone 73 ms against 129 ms (packed for 64 rows,
  used at any row count; tests/benchmarks/linear_micro.py). Results differ from aten by
  float32 rounding only (summation order). Costs one extra copy of the linear weights.

``resolve_linear_backend("auto", ...)`` picks mkldnn where it applies, aten elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

LinearBackend = Literal["auto", "aten", "mkldnn"]

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
    backend: str  # the resolved backend: "aten" or "mkldnn"


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


def build_linears(
    blocks: nn.ModuleList, lm_head: nn.Module, backend: LinearBackend, device, dtype
) -> GPT2Linears:
    """The matmuls of every block and the LM head, for the resolved backend."""
    chosen = resolve_linear_backend(backend, torch.device(device), dtype)

    def conv1d(module: nn.Module) -> Linear:
        if chosen == "mkldnn":  # Conv1D's weight is [in, out]; oneDNN takes [out, in]
            return MkldnnPacked(module.weight.t(), module.bias)
        return AtenConv1D(module.weight, module.bias)

    layers = [
        BlockLinears(
            conv1d(b.attn.c_attn), conv1d(b.attn.c_proj), conv1d(b.mlp.c_fc), conv1d(b.mlp.c_proj)
        )
        for b in blocks
    ]
    head = MkldnnPacked(lm_head.weight, None) if chosen == "mkldnn" else AtenHead(lm_head.weight)
    return GPT2Linears(layers, head, chosen)
