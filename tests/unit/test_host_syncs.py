"""Host-device transfers and syncs of one CUDA decode step, counted on fake CUDA (issue #22).

A decode step on CUDA is: the padded decode's inputs in (`DecodeGraphs.prepare`), the graph
replay (`run`), the engine's one batched sampler call (`sample_chunk`, as `sample_groups`
makes it) and its results back on the host. The target: at most two host-device transfers,
one non-blocking copy of the step's packed inputs from pinned memory and one copy back of
tokens, log-probs and checks, for the plain batched lane (greedy; temperature / top-k /
top-p; seeded and unseeded rows; log-probs and top-n).

What is counted (`HostDeviceTraffic`) follows torch's CUDA sync debug mode
(`torch.cuda.set_sync_debug_mode`, whose checks sit in c10/cuda's `memcpy_and_sync` and
stream / device synchronize) and adds every copy between host and device, non-blocking
ones included:

- a copy between a CPU and a CUDA tensor: `aten._to_copy` / `aten.copy_` across devices
  (`.to`, `.cpu()`, `torch.tensor(..., device=cuda)`, `tolist()` of a CUDA tensor), and a
  CPU tensor or a Python list used as the index or value of a CUDA tensor's `[]`;
- a scalar read of a CUDA tensor (`aten._local_scalar_dense`: `item`, `bool`, `int`);
- ops whose output size depends on CUDA data (nonzero, masked_select, unique,
  repeat_interleave without output_size, indexing with a boolean mask);
- `torch.cuda.synchronize` and CUDA event / stream `synchronize`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel

from app.engine.core.scheduler import ScheduledSeq, SchedulerOutput
from app.engine.model_runner import ModelRunner, handed_off_id
from app.engine.sample import seeded_draw
from app.engine.sample.group_sampling import generated_tokens, launch_chunk, sample_chunk
from app.engine.sample.row import SamplingRow
from app.engine.sample.sampler import Sampler
from app.modeling import gpt2
from app.options.resolve import resolve_sampling_params
from tests.unit.fake_cuda import CUDA, StandInGenerator, check_draws, fake_cuda, move_module

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")

aten = torch.ops.aten
VOCAB = 64
EOS = 2
BLOCK = 4
# Ops whose output size depends on the device's data: the host waits for it.
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


@dataclass(frozen=True)
class Crossing:
    kind: str  # "to device", "to host", "scalar read", "data-dependent shape", "synchronize"
    non_blocking: bool
    pinned: bool  # the host side of a copy (source going up, destination back) is pinned
    where: str  # the app/ line that asked for it

    @property
    def async_upload(self) -> bool:
        return self.kind == "to device" and self.non_blocking and self.pinned


def _caller() -> str:
    for frame in inspect.stack()[2:]:
        path = frame.filename.replace("\\", "/")
        if "/app/" in path:
            return f"{path.split('/app/', 1)[1]}:{frame.lineno} {frame.function}"
    return "?"


def _is_cuda(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cuda"


def _is_host_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


class HostDeviceTraffic(TorchDispatchMode):
    """Records every host-device crossing of the ops run under it (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.crossings: list[Crossing] = []

    def record(self, kind: str, non_blocking: bool = False, source: Any = None) -> None:
        pinned = _is_host_tensor(source) and bool(source.is_pinned())
        self.crossings.append(Crossing(kind, non_blocking, pinned, _caller()))

    def copy(self, src: Any, dst_device: torch.device, non_blocking: bool, dst: Any = None) -> None:
        """`pinned`: the host side is pinned (the source going up, the destination back)."""
        if src.device.type != dst_device.type:
            up = dst_device.type == "cuda"
            self.record("to device" if up else "to host", non_blocking, src if up else dst)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._to_copy.default and "device" in kwargs:
            self.copy(args[0], torch.device(kwargs["device"]), kwargs.get("non_blocking", False))
        elif func is aten.copy_.default:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            self.copy(args[1], args[0].device, bool(non_blocking), args[0])
        elif func is aten._local_scalar_dense.default and _is_cuda(args[0]):
            self.record("scalar read")
        elif func in DATA_DEPENDENT and _is_cuda(args[0]):
            self.record("data-dependent shape")
        return func(*args, **kwargs)

    def index(self, t: torch.Tensor, index: Any, value: Any = None) -> None:
        """A CUDA tensor's `t[index]` / `t[index] = value`: host indices and values are
        copied in first, a boolean mask costs a nonzero."""
        if not _is_cuda(t):
            return
        items = index if isinstance(index, tuple) else (index,)
        for item in items:
            if isinstance(item, list) or (_is_host_tensor(item) and item.dim() > 0):
                self.record("to device")
            elif _is_cuda(item) and item.dtype == torch.bool:
                self.record("data-dependent shape")
        if _is_host_tensor(value) and value.dim() > 0:
            self.record("to device", source=value)


class EventStandIn:
    """torch.cuda.Event on a CPU build (StepTimer's): records nothing, never waits."""

    traffic: HostDeviceTraffic | None = None

    def __init__(self, enable_timing: bool = False) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0

    def synchronize(self) -> None:
        if self.traffic is not None:
            self.traffic.record("synchronize")


@contextmanager
def count_traffic() -> Iterator[HostDeviceTraffic]:
    """Count under `fake_cuda`. Python indexing and `copy_` of fake CUDA tensors run with
    their device hidden from C++ (fake_cuda's guard work-around), so they are checked here,
    before that; `tolist` of a CUDA tensor copies it to the host once, as torch does."""
    traffic = HostDeviceTraffic()
    get, set_, copy_, tolist, nonzero_method = (
        FakeTensor.__getitem__,
        FakeTensor.__setitem__,
        FakeTensor.copy_,
        FakeTensor.tolist,
        FakeTensor.nonzero,
    )

    def getitem(self: torch.Tensor, index: Any) -> Any:
        traffic.index(self, index)
        return get(self, index)

    def setitem(self: torch.Tensor, index: Any, value: Any) -> Any:
        traffic.index(self, index, value)
        return set_(self, index, value)

    def copy(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> Any:
        if _is_cuda(self) and isinstance(src, torch.Tensor) and src.dim() > 0:
            traffic.copy(src, self.device, non_blocking)
        return copy_(self, src, non_blocking=non_blocking)

    def nonzero(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # The method takes a CUDA device guard in C++ before it dispatches: seen here.
        if _is_cuda(self):
            traffic.record("data-dependent shape")
        return nonzero_method(self, *args, **kwargs)

    def to_list(self: torch.Tensor) -> Any:
        return tolist(self.to("cpu")) if _is_cuda(self) else tolist(self)

    with pytest.MonkeyPatch.context() as patch:  # undone on exit: counters do not stack
        patch.setattr(FakeTensor, "__getitem__", getitem)
        patch.setattr(FakeTensor, "__setitem__", setitem)
        patch.setattr(FakeTensor, "copy_", copy)
        patch.setattr(FakeTensor, "tolist", to_list)
        patch.setattr(FakeTensor, "nonzero", nonzero)
        patch.setattr(torch, "nonzero", nonzero)
        patch.setattr(torch.cuda, "synchronize", lambda *a, **k: traffic.record("synchronize"))
        patch.setattr(EventStandIn, "traffic", traffic)
        with traffic:
            yield traffic


def tiny_hf_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=EOS,
    )
    return GPT2LMHeadModel(cfg).eval().to(torch.bfloat16)  # the CUDA default dtype


# Each case: one request's options per decode row (batch order).
SEEDED = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 11}
UNSEEDED = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
CASES: dict[str, list[dict[str, Any]]] = {
    "greedy": [{"do_sample": False}] * 4,
    "top-k / top-p sampling": [UNSEEDED] * 4,
    "mixed greedy and per-row settings": [
        {"do_sample": True, "temperature": 0.7, "top_k": 5},
        {"do_sample": False},
        {"do_sample": True, "temperature": 1.3, "top_k": 0, "top_p": 0.8},
        {"do_sample": True, "top_k": 30, "top_p": 0.95},
    ],
    "mixed seeded and unseeded": [SEEDED, UNSEEDED, {**SEEDED, "seed": 5}, UNSEEDED],
    "log-probs asked (top-n)": [
        {"do_sample": False, "top_n_tokens": 3},
        {**UNSEEDED, "top_n_tokens": 5},
        {"do_sample": False},
        {**SEEDED, "top_n_tokens": 2},
    ],
}


@dataclass
class DecodeStep:
    runner: ModelRunner
    sampler: Sampler
    sched: SchedulerOutput
    rows: list[SamplingRow]

    def run(self) -> list[Any]:
        """What LLMEngine._step_batch does on the device side of a decode step."""
        self.runner.step_timer.begin_step(continuing=True)
        result = self.runner.execute_step(self.sched)
        n = len(self.rows)
        chunk = [(None, [None] * n, self.rows, list(range(n)))]
        return sample_chunk(self.sampler, result.logits, chunk)


@pytest.fixture
def decode_step(monkeypatch: pytest.MonkeyPatch) -> Callable[..., DecodeStep]:
    return decode_step_builder(monkeypatch)


def decode_step_builder(monkeypatch: pytest.MonkeyPatch) -> Callable[..., DecodeStep]:
    """A decode step on fake CUDA: bfloat16, the Triton paged attention (its fake op), the
    decode graphs' replay (recorded) or their eager padded forward."""
    monkeypatch.setattr(gpt2, "triton_available", lambda: (True, ""))
    monkeypatch.setattr(seeded_draw, "_default_generator", StandInGenerator)
    monkeypatch.setattr(torch.cuda, "Event", EventStandIn)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    replays: list[Any] = []
    hf = tiny_hf_model()  # real weights made here, moved to fake CUDA by `build`

    class Replay:
        def replay(self) -> None:
            replays.append(self)

    def build(options: list[dict[str, Any]], replayed: bool = True) -> DecodeStep:
        runner = ModelRunner(
            move_module(hf), num_blocks=32, block_size=BLOCK, max_num_seqs=8, enforce_eager=True,
            static_decode=True,
        )  # fmt: skip
        graphs = runner.decode_graphs
        assert graphs is not None and graphs.paged_attention
        if replayed:  # as after capture (capture itself needs a GPU)
            graphs.graphs.update({shape: Replay() for shape in graphs.shapes})
        seqs, rows = [], []
        for i, job in enumerate(options):
            prompt = [5 + i, 6, 7, 8, 9]
            start = len(prompt) + 2 * i  # different contexts, some past one block
            table = list(range(4 * i, 4 * i + 4))
            seqs.append(ScheduledSeq(i, f"r{i}", [10 + i], start, table, sample=True))
            params = resolve_sampling_params(job, {"eos_token_id": EOS}, 64, len(prompt))
            gen = StandInGenerator(CUDA) if params.seed is not None else None
            rows.append(SamplingRow.from_params(params, [*prompt, 3], len(prompt), gen))
        sched = SchedulerOutput(seqs=seqs, num_batched_tokens=len(seqs))
        return DecodeStep(runner, Sampler(StandInGenerator(CUDA)), sched, rows)

    build.replays = replays  # type: ignore[attr-defined]
    return build


def _describe(crossings: list[Crossing]) -> str:
    return "\n".join(
        f"  {c.kind}{' non-blocking' if c.non_blocking else ''}{' pinned' if c.pinned else ''}"
        f" at {c.where}"
        for c in crossings
    )


def _check_plain(crossings: list[Crossing]) -> None:
    """One asynchronous upload of the step's packed inputs, one copy back: nothing else."""
    assert len(crossings) <= 2, f"{len(crossings)} host-device crossings:\n{_describe(crossings)}"
    uploads = [c for c in crossings if c.kind == "to device"]
    assert len(uploads) == 1 and uploads[0].async_upload, _describe(crossings)
    assert "static_decode.py" in uploads[0].where
    assert [c.kind for c in crossings if c.kind != "to device"] == ["to host"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_decode_step_crosses_at_most_twice(
    monkeypatch: pytest.MonkeyPatch, decode_step: Callable[..., DecodeStep], case: str
) -> None:
    """The second step of a batch (steady decoding: the sampler's staged settings are the
    first step's, already on the device) makes two crossings; the first at most one more,
    a non-blocking copy of the sampler's staged settings from pinned memory."""
    with fake_cuda(monkeypatch), check_draws(monkeypatch):
        step = decode_step(CASES[case])
        with count_traffic() as traffic:
            picks = step.run()
        first = traffic.crossings
        with count_traffic() as traffic:
            assert len(step.run()) == len(picks) == len(CASES[case])
        steady = traffic.crossings
    assert decode_step.replays  # type: ignore[attr-defined]
    _check_plain(steady)
    staged = [c for c in first if "device_inputs.py" in c.where]
    assert len(staged) <= 1 and all(c.async_upload for c in staged), _describe(first)
    _check_plain([c for c in first if c not in staged])


def test_the_eager_padded_step_crosses_twice_too(
    monkeypatch: pytest.MonkeyPatch, decode_step: Callable[..., DecodeStep]
) -> None:
    """Without graphs (--enforce-eager with static decode), the same padded forward eagerly."""
    with fake_cuda(monkeypatch):
        step = decode_step(CASES["greedy"], replayed=False)
        with count_traffic() as traffic:
            step.run()
    _check_plain(traffic.crossings)


def test_the_counter_sees_what_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind of crossing is counted once where it happens, and device-only work is not."""
    with fake_cuda(monkeypatch):
        x = torch.zeros(8, device=CUDA)
        host = torch.arange(8.0)
        cases: list[tuple[Callable[[], Any], list[str]]] = [
            (lambda: torch.tensor([1, 2], device=CUDA), ["to device"]),
            (lambda: x.tolist(), ["to host"]),
            (lambda: x.cpu(), ["to host"]),
            (lambda: x.sum().item(), ["scalar read"]),
            (lambda: bool(x.any()), ["scalar read"]),
            (lambda: x.nonzero(), ["data-dependent shape"]),
            (lambda: torch.nonzero(x), ["data-dependent shape"]),
            (lambda: torch.masked_select(x, x > 0), ["data-dependent shape"]),
            (lambda: x[x > 0], ["data-dependent shape"]),
            (lambda: x[[1, 2]], ["to device"]),
            (lambda: x.copy_(host), ["to device"]),
            (lambda: x.copy_(host.pin_memory(), non_blocking=True), ["to device"]),
            (lambda: host.pin_memory().to(CUDA, non_blocking=True), ["to device"]),
            (lambda: torch.cuda.synchronize(), ["synchronize"]),
            (lambda: (x * 2).softmax(0).argmax(), []),  # device work only
            (lambda: x[2:5], []),
        ]
        for fn, want in cases:
            with count_traffic() as traffic:
                try:
                    fn()
                except RuntimeError:  # a data-dependent op cannot run on fake CUDA, once seen
                    assert want == ["data-dependent shape"]
            assert [c.kind for c in traffic.crossings] == want, inspect.getsource(fn)
        with count_traffic() as traffic:
            x.copy_(host.pin_memory(), non_blocking=True)
            x.copy_(host, non_blocking=True)
            x.copy_(host.pin_memory())
        assert [c.async_upload for c in traffic.crossings] == [True, False, False]


@pytest.mark.parametrize("case", list(CASES))
def test_an_overlapped_step_queues_without_waiting(
    monkeypatch: pytest.MonkeyPatch, decode_step: Callable[..., DecodeStep], case: str
) -> None:
    """Async scheduling's worker job (app/engine/async_scheduling.py): the forward takes the
    previous step's tokens on the device (`handed_off`), the sampler call is launched and
    its results start back in one non-blocking copy. Nothing in it waits for the device,
    so the worker queues step k+1 while step k runs; the one wait is the engine thread's,
    on that copy (`SampleLaunch.finish`)."""
    with fake_cuda(monkeypatch), check_draws(monkeypatch):
        step = decode_step(CASES[case])
        step.run()  # the first step: the sampler's staged settings go up once
        n = len(step.rows)
        previous = torch.arange(100, 100 + n, device=CUDA)  # step k's tokens, on the device
        for j, item in enumerate(step.sched.seqs):
            item.token_ids[-1] = handed_off_id(n - 1 - j)
        chunk = [(None, [None] * n, step.rows, list(range(n)))]
        with count_traffic() as traffic:
            step.runner.step_timer.begin_step(continuing=True)
            result = step.runner.execute_step(step.sched, handed_off=previous)
            launch = launch_chunk(step.sampler, result.logits, chunk)
        queued = traffic.crossings
        with count_traffic() as traffic:
            picks = generated_tokens(launch.finish())
        waited = traffic.crossings
    assert len(picks) == n
    uploads = [c for c in queued if c.kind == "to device"]
    assert len(uploads) == 1 and uploads[0].async_upload, _describe(queued)
    back = [c for c in queued if c.kind != "to device"]
    assert [(c.kind, c.non_blocking, c.pinned) for c in back] == [("to host", True, True)], (
        _describe(queued)
    )
    assert [c.kind for c in waited] == ["synchronize"], _describe(waited)
