"""The padded decode's SDPA backends are pinned around graph capture and eager padded steps
(issue #22), and only there: prefill keeps torch's defaults.

Every SDPA call is observed with the backends torch would choose from at that moment
(`torch.nn.attention._cur_sdpa_kernel_backends`, the global flags `sdpa_kernel` sets): the
captured decode must see exactly `DECODE_SDPA_BACKENDS` in that priority (no cuDNN), the
varlen forward the defaults it had before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends
from transformers import GPT2Config, GPT2LMHeadModel

from app.engine.core.scheduler import ScheduledSeq, SchedulerOutput
from app.engine.model_runner import ModelRunner
from app.modeling import cuda_graphs
from app.modeling.cuda_graphs import DECODE_SDPA_BACKENDS, DecodeGraphs
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from tests.unit.fake_cuda import CUDA, fake_cuda, move_module

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")

BLOCK = 4


def tiny_hf_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[SDPBackend]]:
    """The enabled backends, in priority order, at every SDPA call."""
    calls: list[list[SDPBackend]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def observed(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(_cur_sdpa_kernel_backends(with_priority=True))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", observed)
    return calls


@contextmanager
def capture_stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """torch.cuda's capture calls on a CPU build: recorded, the captured code run as is."""
    log: list[str] = []

    class Graph:
        def replay(self) -> None:
            log.append("replay")

    @contextmanager
    def graph(g: Graph, pool: Any = None) -> Iterator[None]:
        log.append("capture")
        yield

    @contextmanager
    def device(d: Any) -> Iterator[None]:
        yield

    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    yield log


def test_capture_runs_every_decode_sdpa_call_on_the_pinned_backends(
    monkeypatch: pytest.MonkeyPatch, sdpa_calls: list[list[SDPBackend]]
) -> None:
    """Gather + SDPA (no Triton kernel): warm-ups and captures of every ladder shape."""
    default = _cur_sdpa_kernel_backends(with_priority=True)
    assert default != DECODE_SDPA_BACKENDS  # else the test could not tell them apart
    hf = tiny_hf_model()
    with fake_cuda(monkeypatch), capture_stand_ins(monkeypatch) as log:
        model = PagedGPT2.from_hf(move_module(hf))
        kv = KVCache.allocate(hf.config, 9, BLOCK, torch.float32, CUDA)
        graphs = DecodeGraphs(model, kv, max_num_seqs=2, scratch_block=8, paged_attention=False)
        graphs.capture()
    shapes = len(graphs.shapes)
    assert log == ["capture"] * shapes and len(graphs.graphs) == shapes
    # One SDPA call per layer, for each shape's warm-up and its capture.
    assert len(sdpa_calls) == 2 * shapes * hf.config.n_layer
    assert all(call == DECODE_SDPA_BACKENDS for call in sdpa_calls), sdpa_calls
    assert _cur_sdpa_kernel_backends(with_priority=True) == default  # restored after


def test_eager_padded_steps_pin_the_backends_and_prefill_keeps_the_defaults(
    sdpa_calls: list[list[SDPBackend]],
) -> None:
    """On CPU (nothing captured): a prefill step by the varlen forward, then a decode step by
    the eager padded forward (the replay-time fallback of a shape without a graph)."""
    default = _cur_sdpa_kernel_backends(with_priority=True)
    runner = ModelRunner(
        tiny_hf_model(), num_blocks=8, block_size=BLOCK, static_decode=True,
        native_kernels="off", max_num_seqs=2,
    )  # fmt: skip
    assert runner.decode_graphs is not None and not runner.decode_graphs.paged_attention
    prompt = [5, 6, 7, 8, 9]
    prefill = ScheduledSeq(0, "r", prompt, 0, [0, 1], sample=True)
    runner.execute_step(SchedulerOutput(seqs=[prefill], num_batched_tokens=len(prompt)))
    n_prefill = len(sdpa_calls)
    assert n_prefill > 0 and all(call == default for call in sdpa_calls)
    assert runner.decode_graphs.num_padded_steps == 0
    decode = ScheduledSeq(0, "r", [10], len(prompt), [0, 1], sample=True)
    runner.execute_step(SchedulerOutput(seqs=[decode], num_batched_tokens=1))
    assert runner.decode_graphs.num_padded_steps == 1
    decode_calls = sdpa_calls[n_prefill:]
    assert decode_calls and all(call == DECODE_SDPA_BACKENDS for call in decode_calls)
    assert _cur_sdpa_kernel_backends(with_priority=True) == default


def test_the_pinned_list_prefers_flash_then_efficient_then_math() -> None:
    assert cuda_graphs.DECODE_SDPA_BACKENDS == [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
