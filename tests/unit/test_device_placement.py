"""Device placement on "cuda" without a GPU (issue #22): FakeTensorMode on a CPU build.

Every test runs a tensor path with its model, logits, caches and generators on a fake
`cuda:0` (tests/unit/fake_cuda.py); any op mixing a CUDA and a CPU tensor raises
`FakeTensorDeviceMismatchError`, as it would on a GPU, and a draw whose generator is on
another device than its probabilities is recorded by `check_draws`. The tests assert where
tensors are, never values (fake tensors hold none).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.stopping_criteria import StopStringCriteria

from app.engine.beam_search import BeamSearch, prepare_generation
from app.engine.sample import seeded_draw
from app.engine.sample.row import SamplingRow
from app.engine.sample.sampler import Sampler
from app.engine.step_timing import StepTimer
from app.modeling import gpt2
from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.cuda_graphs import DecodeGraphs
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.loader import load_model, select_device
from app.modeling.static_decode import DecodeShape
from app.options.resolve import resolve_sampling_params
from tests.unit.fake_cuda import (
    CUDA,
    StandInGenerator,
    check_draws,
    fake_cuda,
    fake_like,
    move_module,
)

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")

VOCAB = 64
MINI_DIR = Path(__file__).resolve().parents[2] / "models" / "kogpt2-mini"
EOS = 2
PROMPT = [5, 6, 7]


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
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


# Beam search and beam sampling with every processor family generate builds for them.
BEAM_CASES: list[dict[str, Any]] = [
    {"num_beams": 3},
    {"num_beams": 3, "do_sample": True},
    {
        "num_beams": 3,
        "min_length": 5,
        "min_new_tokens": 3,
        "suppress_tokens": [9, 10],
        "begin_suppress_tokens": [11],
        "forced_eos_token_id": EOS,
        "repetition_penalty": 1.3,
        "no_repeat_ngram_size": 2,
        "bad_words_ids": [[12], [13, 14]],
        "length_penalty": 0.7,
    },
    {
        "num_beams": 2,
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.9,
        "eta_cutoff": 0.001,
        "min_new_tokens": 2,
        "forced_eos_token_id": EOS,
        "suppress_tokens": [9],
    },
    {"num_beams": 2, "do_sample": True, "typical_p": 0.9, "epsilon_cutoff": 0.0003},
    {"num_beams": 2, "do_sample": True, "min_p": 0.05, "renormalize_logits": True},
    # Not here: watermarking_config. Its processor makes its own torch.Generator on the
    # model's device, which a CPU build cannot create for "cuda".
]


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("options", BEAM_CASES)
def test_beam_step_stays_on_the_model_device(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], seeded: bool
) -> None:
    model = tiny_hf_model()
    with fake_cuda(monkeypatch) as reads, check_draws(monkeypatch) as draws:
        move_module(model)
        assert model.device == CUDA
        reads.bool_answer = False  # generate's checks: "(eos < 0).any()" and the like
        prepared = prepare_generation(model, PROMPT, {**options, "max_new_tokens": 4})
        assert prepared.device == CUDA  # generate built the processors from CUDA ids
        reads.bool_answer = True  # Categorical's argument validation (eta) passes
        generator = StandInGenerator(CUDA) if seeded else None  # make_generator(seed, CUDA)
        beam = BeamSearch(prepared, PROMPT, generator)
        b = int(options["num_beams"])
        for rows in (1, b, b):  # the prompt's row, then the running beams' rows
            step = beam.step(torch.empty(rows, VOCAB, device=CUDA))
            assert len(step.parents) == len(step.tokens) == b
        beam.results()
    want = [("multinomial", CUDA, CUDA if seeded else None)] * 3 if options.get("do_sample") else []
    assert draws == want


def test_beam_step_with_stop_strings_stays_on_the_model_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stop-string criterion prepare_generation adds itself (with the tokenizer)."""
    loaded = load_model(str(MINI_DIR), device="cpu")
    vocab = loaded.config.vocab_size
    prompt = loaded.tokenizer("대한민국은")["input_ids"]
    options = {"num_beams": 2, "stop_strings": ["다", "."], "max_new_tokens": 4}
    with fake_cuda(monkeypatch) as reads:
        model = move_module(loaded.model)
        reads.bool_answer = False
        prepared = prepare_generation(model, prompt, options, loaded.tokenizer)
        reads.bool_answer = True
        assert any(isinstance(c, StopStringCriteria) for c in prepared.stopping_criteria)
        beam = BeamSearch(prepared, prompt, None)
        for rows in (1, 2):
            beam.step(torch.empty(rows, vocab, device=CUDA))


# The sampler's option families; every case runs greedy, unseeded and seeded sampling rows.
SAMPLER_CASES: list[dict[str, Any]] = [
    {},
    {"temperature": 0.7, "top_k": 5},  # the small-k top-k path
    {"temperature": 1.3, "top_k": 0, "top_p": 0.8},  # full-row warpers
    {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
    {"frequency_penalty": 0.5, "presence_penalty": -0.3, "repetition_penalty": 1.2},
    {"sequence_bias": [[[9], -2.0], [[6, 9], 1.5]], "bad_words_ids": [[12], [7, 13]]},
    {"suppress_tokens": [9, 10], "begin_suppress_tokens": [11, EOS]},
    {"min_new_tokens": 5, "min_length": 6},
    {"forced_eos_token_id": EOS, "max_new_tokens": 1},
    {"exponential_decay_length_penalty": (0, 1.6)},
    {"remove_invalid_values": True, "renormalize_logits": True, "top_n_tokens": 3},
    {"typical_p": 0.6, "top_k": 0},
    {"epsilon_cutoff": 0.02, "top_k": 0},
    {"eta_cutoff": 0.05, "top_k": 0},
    {"min_p": 0.1, "top_k": 0},
    {"top_h": 0.4},
    # Not here: watermarking_config (transformers' processor makes a CUDA torch.Generator,
    # which a CPU build cannot create).
]


@pytest.mark.parametrize("options", SAMPLER_CASES)
def test_sampler_stays_on_the_logits_device(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    jobs = [
        {**options, "do_sample": False},
        {**options, "do_sample": True},
        {**options, "do_sample": True, "seed": 7},
    ]
    # torch.cuda.default_generators is empty on a CPU build: a stand-in on the device.
    monkeypatch.setattr(seeded_draw, "_default_generator", StandInGenerator)
    with fake_cuda(monkeypatch) as reads, check_draws(monkeypatch) as draws:
        rows = []
        for job in jobs:
            params = resolve_sampling_params(job, {"eos_token_id": EOS}, 64, len(PROMPT))
            seeded = StandInGenerator(CUDA) if params.seed is not None else None  # make_generator
            rows.append(SamplingRow.from_params(params, [*PROMPT, 8], len(PROMPT), seeded))
        reads.bool_answer = True  # the value checks and Categorical's validation pass
        out = Sampler(StandInGenerator(CUDA)).sample(torch.empty(3, VOCAB, device=CUDA), rows)
        assert len(out.token_ids) == 3
    assert draws, "no draw was checked"
    assert all(tensor == CUDA and gen == CUDA for _, tensor, gen in draws), draws


def test_kv_cache_block_copies_stay_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_hf_model().config
    with fake_cuda(monkeypatch):
        kv = KVCache.allocate(cfg, num_blocks=6, block_size=4, dtype=torch.float16, device=CUDA)
        kv.copy_blocks([(0, 3), (1, 4), (3, 5)])
        assert all(t.device == CUDA for t in (*kv.keys, *kv.values))


def test_a_cuda_device_is_made_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda:N sets N as the current device (graphs capture, events record there)."""
    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", 1)]
    assert select_device("cuda") == torch.device("cuda", 0)  # named: set_device needs an index
    assert select_device("auto") == torch.device("cuda", 0)
    assert calls[1:] == [torch.device("cuda", 0)] * 2
    assert select_device("cpu") == torch.device("cpu")
    assert len(calls) == 3


def test_step_timing_events_record_on_the_model_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The busy/idle events record on the model device's stream, not the current device's
    (a CPU build has no CUDA events: a recorder stands in; no timing is read)."""
    recorded: list[Any] = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing

        def record(self, stream: Any = None) -> None:
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    timer = StepTimer(torch.device("cuda", 1))
    timer.forward_started()
    timer.forward_finished()
    assert recorded == [("stream of", torch.device("cuda", 1))] * 2


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor of a StepInput (its decode batches, paged decode and prefill chunks)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list):
        return [t for item in obj for t in _tensors(item)]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


def _replace_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, list):
        return [_replace_tensors(item, fn) for item in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: _replace_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)
        }
        return dataclasses.replace(obj, **changes)
    return obj


# One prefill from 0; a decode; a chunk continuing a sequence (its mask and context blocks).
STEP_CHUNKS = [
    SeqChunk(token_ids=PROMPT, start_pos=0, block_table=[0]),
    SeqChunk(token_ids=[9], start_pos=5, block_table=[2, 3]),
    SeqChunk(token_ids=[9, 10, 11], start_pos=4, block_table=[4, 5]),
]


def test_step_input_tensors_all_reach_the_device() -> None:
    """build_step_input moves every tensor it builds to the step's device ("meta" stands for
    a device other than the CPU: its index math uses data, which fake tensors do not have)."""
    step = build_step_input(STEP_CHUNKS, 4, "meta", max_positions=64, decode_batch_tokens=0)
    tensors = _tensors(step)
    assert len(tensors) >= 8
    assert all(t.device.type == "meta" for t in tensors)


def test_paged_forward_stays_on_the_model_device(monkeypatch: pytest.MonkeyPatch) -> None:
    hf = tiny_hf_model()
    # The step's layout as on CUDA (decode batches unbounded), its tensors then put on CUDA.
    step = build_step_input(STEP_CHUNKS, 4, "cpu", max_positions=64, decode_batch_tokens=0)
    with fake_cuda(monkeypatch):
        move_module(hf)
        model = PagedGPT2.from_hf(hf)
        step = _replace_tensors(step, fake_like)
        kv = KVCache.allocate(hf.config, 8, 4, torch.float32, CUDA)
        logits = model.forward(step, kv)
        assert logits.device == CUDA
        assert logits.shape == (len(STEP_CHUNKS), VOCAB)


def test_paged_forward_with_the_triton_kernel_stays_on_the_model_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA forward: decodes and short chunks through torch.ops.kogpt.paged_decode_attention
    (its fake implementation checks every argument's device; no triton needed)."""
    monkeypatch.setattr(gpt2, "triton_available", lambda: (True, ""))
    hf = tiny_hf_model().to(torch.bfloat16)  # the server's default dtype on CUDA
    step = build_step_input(STEP_CHUNKS, 4, "cpu", max_positions=64, paged_decode=True)
    assert step.paged_decode is not None and step.decode == []
    with fake_cuda(monkeypatch):
        move_module(hf)
        model = PagedGPT2.from_hf(hf)
        assert model.decode_kernel() == "triton" and model.paged_decode
        kv = KVCache.allocate(hf.config, 8, 4, torch.bfloat16, CUDA)
        cuda_step = _replace_tensors(step, fake_like)
        logits = model.forward(cuda_step, kv)
        assert logits.device == CUDA and logits.dtype == torch.bfloat16
        assert logits.shape == (len(STEP_CHUNKS), VOCAB)
        # A table left on the host is refused, as the kernel would fault on it.
        host_tables = dataclasses.replace(
            cuda_step.paged_decode, block_tables=step.paged_decode.block_tables
        )
        with pytest.raises(ValueError, match="block_tables is on cpu"):
            model.forward(dataclasses.replace(cuda_step, paged_decode=host_tables), kv)


def test_padded_decode_with_the_triton_kernel_stays_on_the_model_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The graphed decode step as captured on CUDA: one context bucket, the Triton op."""
    monkeypatch.setattr(gpt2, "triton_available", lambda: (True, ""))
    hf = tiny_hf_model().to(torch.float16)
    seqs = [SeqChunk([9], 5, [2, 3]), SeqChunk([4], 0, [1]), SeqChunk([7], 30, list(range(8)))]
    with fake_cuda(monkeypatch):
        move_module(hf)
        model = PagedGPT2.from_hf(hf)
        kv = KVCache.allocate(hf.config, 9, 4, torch.float16, CUDA)
        graphs = DecodeGraphs(model, kv, max_num_seqs=4, scratch_block=8)
        assert graphs.paged_attention and graphs.context_blocks == [16]
        shape = graphs.shape_for(seqs)
        assert shape == DecodeShape(4, 16)
        logits = graphs.run(shape, graphs.prepare(seqs, shape))
        assert logits.device == CUDA and logits.shape == (3, VOCAB)
