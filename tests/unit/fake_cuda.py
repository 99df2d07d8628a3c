"""Fake "cuda" tensors on a CPU-only build, for device-placement tests (issue #22).

torch's `FakeTensorMode` creates tensors that carry a device and a shape but no data, and
raises `FakeTensorDeviceMismatchError` on any op that mixes devices (a CUDA tensor and a
CPU one), exactly where a real GPU run would raise. Code run under `fake_cuda()` with a
model, logits and caches on `CUDA` therefore fails on every device mix-up it contains.

Two things a fake tensor cannot do, handled here and nowhere else:

- read a value back to Python (`tolist`, `item`, `int(t)`, `bool(t)`): a fake tensor has no
  data. Host reads return a placeholder (0 / 0.0 / `bool_answer`); the code runs on,
  its device placement still checked. Tests under this mode assert devices, never values.
- a CUDA `torch.Generator`: a CPU build refuses to create one. See `StandInGenerator` and
  `check_draws`.
- the CUDA device guard that `int(t)` and Python indexing take in C++ (a CPU build has no
  CUDA guard): worked around in `fake_cuda`, the devices still checked.
- pinned host memory (a CPU build has no pinned allocator): under `fake_cuda`,
  `Tensor.pin_memory()` returns a copy marked as pinned, and `is_pinned()` reads the mark.

Use `torch.device("cuda", 0)`, not "cuda": a device without an index asks the (absent)
CUDA runtime for the current device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA = torch.device("cuda", 0)
_CPU = torch.device("cpu")
_aten = torch.ops.aten


class _HostReads(TorchDispatchMode):
    """Answers a fake tensor's scalar read with a placeholder (fake tensors hold no data)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.bool_answer = True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _aten._local_scalar_dense.default:
            self.count += 1
            dtype = args[0].dtype
            if dtype == torch.bool:
                return self.bool_answer
            return 0.0 if dtype.is_floating_point or dtype.is_complex else 0
        return func(*args, **(kwargs or {}))


def _to_host_first(name: str) -> Any:
    # int(t) / float(t) / index(t) of a CUDA tensor take a CUDA device guard in C++, which a
    # CPU build refuses; on a GPU they copy to the host first, which is what this does.
    real = getattr(torch.Tensor, name)

    def convert(self: torch.Tensor) -> Any:
        if self.device.type == "cuda":
            return real(self.to("cpu"))
        return real(self)

    return convert


def _without_device_guard(real: Any) -> Any:
    # Python indexing (t[i], t[i] = v), ~t and t.copy_(s) also take a CUDA device guard in
    # C++ before they dispatch. The CUDA operands are shown as CPU tensors to that guard
    # only, and the result is put back on CUDA; fake mode still checks the operands against
    # each other.
    # (A CPU index into a CUDA tensor, or a CPU value copied into a slice of one, is allowed
    # on a GPU too.)
    def call(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        device = self.device
        if device.type != "cuda":
            return real(self, *args, **kwargs)
        swapped = [
            t
            for t in (self, *tree_leaves(args))
            if isinstance(t, FakeTensor) and t.device == device
        ]
        for t in swapped:
            t.fake_device = _CPU
        try:
            out = real(self, *args, **kwargs)
        finally:
            for t in swapped:
                t.fake_device = device
        if isinstance(out, FakeTensor) and out.device == _CPU:
            out.fake_device = device
        return out

    return call


def _pin_memory(self: torch.Tensor, *args: Any) -> torch.Tensor:
    # A CPU build has no pinned allocator: a copy (as pin_memory makes), marked as pinned.
    pinned = self.clone()
    pinned._fake_pinned = True  # type: ignore[attr-defined]
    return pinned


def _is_pinned(self: torch.Tensor, *args: Any) -> bool:
    return bool(getattr(self, "_fake_pinned", False))


@contextmanager
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[_HostReads]:
    """A `FakeTensorMode` (real CPU tensors allowed in, as constants a module holds) in which
    tensors made with device `CUDA` are fake CUDA tensors. Yields the host-read answerer:
    set its `bool_answer` so that the code's value checks pass (`(x < 0).any()` guards want
    False, `constraint.check(x).all()` ones want True)."""
    for name in ("__int__", "__float__", "__index__"):
        monkeypatch.setattr(FakeTensor, name, _to_host_first(name), raising=False)
    for name in ("__getitem__", "__setitem__", "__invert__", "copy_"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(FakeTensor, name, _without_device_guard(real), raising=False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", _pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", _is_pinned)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    reads = _HostReads()
    with mode, reads:
        yield reads


def fake_like(t: torch.Tensor, device: torch.device = CUDA) -> torch.Tensor:
    """A fake tensor of `t`'s shape, strides and dtype on `device` (call under `fake_cuda`)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


def move_module(module: torch.nn.Module, device: torch.device = CUDA) -> torch.nn.Module:
    """Replace every parameter and buffer of `module` by a fake one on `device` (call under
    `fake_cuda`; `module.to` cannot: it copies data, which fake CUDA tensors do not hold)."""
    for mod in module.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[key] = torch.nn.Parameter(fake_like(p, device), requires_grad=False)
        for key, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[key] = fake_like(b, device)
    return module


class StandInGenerator:
    """A generator on `device` for the draws under `fake_cuda` (a CPU build cannot create a
    CUDA `torch.Generator`): `check_draws` checks its device against the draw's tensor and
    draws without it (a fake draw has no values to take from any generator)."""

    def __init__(self, device: torch.device = CUDA) -> None:
        self.device = device

    def get_state(self) -> None:
        return None

    def set_state(self, state: Any) -> None:
        pass


@contextmanager
def check_draws(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any, Any]]]:
    """Record every `torch.multinomial` / `Tensor.exponential_` as (op, tensor's device,
    generator's device or None). FakeTensorMode does not check a generator's device; real
    CUDA refuses a CPU generator on CUDA tensors ("Expected a 'cuda' device type for
    generator"), and a draw on the CPU uses the CPU's stream, not the device's."""
    draws: list[tuple[str, Any, Any]] = []
    real_multinomial = torch.multinomial
    real_exponential = torch.Tensor.exponential_

    def check(name: str, t: torch.Tensor, generator: Any) -> Any:
        draws.append((name, t.device, None if generator is None else generator.device))
        return None if isinstance(generator, StandInGenerator) else generator

    def multinomial(probs: torch.Tensor, *args: Any, generator: Any = None, **kw: Any) -> Any:
        return real_multinomial(
            probs, *args, generator=check("multinomial", probs, generator), **kw
        )

    def exponential_(self: torch.Tensor, *args: Any, generator: Any = None, **kw: Any) -> Any:
        gen = check("exponential_", self, generator)
        return real_exponential(self, *args, generator=gen, **kw)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    monkeypatch.setattr(FakeTensor, "exponential_", exponential_, raising=False)
    yield draws
