"""The Triton kernel launches on its tensors' CUDA device (issue #22, `--device cuda:N`).

Triton launches on the calling thread's current CUDA device. `select_device` makes cuda:N
current on the thread that loads the model, but the engine runs on its own thread, whose
current device is 0: the op must make the tensors' device current around the launch (torch's
own ops guard their device themselves). Checked on fake CUDA tensors on cuda:1, with the
kernel module and `torch.cuda.device` replaced by recorders (a CPU build has neither).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app.modeling import paged_attention_op
from tests.unit.fake_cuda import fake_cuda

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")

CUDA1 = torch.device("cuda", 1)


def test_the_triton_launch_runs_with_the_tensors_device_current(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    current: list[Any] = [None]  # the thread's current device as torch.cuda.device sets it
    launches: list[Any] = []

    @contextmanager
    def device(d: Any) -> Iterator[None]:
        previous, current[0] = current[0], torch.device(d)
        try:
            yield
        finally:
            current[0] = previous

    def kernel(*args: Any) -> None:
        launches.append(current[0])

    kernels = SimpleNamespace(paged_decode_attention=kernel)
    monkeypatch.setattr(paged_attention_op, "triton_available", lambda: (True, ""))
    monkeypatch.setattr(
        paged_attention_op, "importlib", SimpleNamespace(import_module=lambda name: kernels)
    )
    monkeypatch.setattr(torch.cuda, "device", device)
    run = paged_attention_op.paged_decode_attention._init_fn  # the op's real implementation
    with fake_cuda(monkeypatch):
        q = torch.empty(2, 4, 8, dtype=torch.float16, device=CUDA1)
        cache = torch.empty(32, 4, 8, dtype=torch.float16, device=CUDA1)
        tables = torch.zeros(2, 4, dtype=torch.int32, device=CUDA1)
        lens = torch.ones(2, dtype=torch.int32, device=CUDA1)
        run(q, cache, cache, tables, lens, None, torch.empty_like(q), 8, 32, 0.35)
    assert launches == [CUDA1]
    assert current[0] is None  # and the previous one is current again
