"""The CUDA decode path with the Triton paged attention (issue #22). Marked `gpu`; skipped
where torch sees no CUDA device (the same kernels run on CPU through Triton's interpreter in
tests/unit/test_triton_attention.py and test_static_decode.py).

In bfloat16 (the server's default on CUDA) and float16, on the embedded model (4 layers,
1,024 positions):

- the kernel against float64 SDPA on CUDA tensors, and a row's bits independent of its batch;
- the model resolves the Triton kernel and captures one decode graph per batch size;
- decode logits at contexts of 300 and 1,000 tokens against transformers' float32 forward;
- greedy, seeded sampling, beams, n > 1 (copy on write) and prefix-cache hits through the
  engine: replayed graphs give exactly the tokens of the same padded step run eagerly, a
  seeded request repeats itself, and greedy agrees with the gather + SDPA path;
- the KV pool sized from free memory counts the decode graphs, and everything fits;
- a decode step syncs once; async scheduling's overlapped step (tokens handed over on the
  device, sampler launched) not at all, and gives the synchronous step's tokens.

Run on a GPU host with `python -m pytest -m gpu tests/gpu -q` (or `make gpu-check`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from app.config import Settings
from app.engine.core.scheduler import ScheduledSeq, SchedulerOutput
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.model_runner import ModelRunner, handed_off_id
from app.engine.sample.group_sampling import generated_tokens, launch_chunk, sample_chunk
from app.engine.sample.row import SamplingRow, make_generator
from app.engine.sample.sampler import Sampler
from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.loader import DEFAULT_MODEL_DIR, load_model
from app.modeling.paged_attention_op import paged_decode_attention
from app.modeling.static_decode import decode_forward
from app.options.resolve import resolve_sampling_params
from app.state import build_state
from tests.unit.test_triton_attention import CONTEXTS, TOLERANCE, make_case, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
DTYPES = ["bfloat16", "float16"]
# Decode logits against transformers' float32 forward (|logits| up to ~16 on this model):
# measured on CPU at 700 tokens, bf16 0.04 and fp16 0.007; ~6x margin for GPU kernels.
LOGIT_TOLERANCE = {torch.bfloat16: 0.25, torch.float16: 0.05}
SENTENCE = "대한민국은 민주공화국이다. 모든 국민은 법 앞에 평등하다. 국회는 법률을 제정한다. "


@pytest.fixture(scope="module", params=DTYPES)
def loaded(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return load_model(str(DEFAULT_MODEL_DIR), device="cuda", dtype=request.param)


def long_prompt(loaded, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    ids: list[int] = []
    while len(ids) < n:
        ids += loaded.tokenizer.encode(SENTENCE)
    return ids[:n]


def on_cuda(case: dict) -> dict:
    return {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def run_op(case: dict, **changes: Any) -> torch.Tensor:
    args = case | changes
    out = torch.full_like(args["q"], float("nan"), memory_format=torch.contiguous_format)
    paged_decode_attention(
        args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["context_lens"],
        args["rows"], out, args["block_size"], args["max_context"], args["scale"],
    )  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kernel_matches_sdpa_on_cuda(dtype: torch.dtype) -> None:
    case = on_cuda(make_case(0, CONTEXTS, dtype, 16))
    out = run_op(case)
    got = out[case["rows"]].double().cpu()
    expected = reference(
        {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    )
    assert (got - expected).abs().max().item() < TOLERANCE[dtype]
    unasked = torch.ones(out.shape[0], dtype=torch.bool, device=CUDA)
    unasked[case["rows"]] = False
    assert out[unasked].isnan().all()


def test_a_row_gets_the_same_bits_in_any_batch_on_cuda() -> None:
    case = on_cuda(make_case(5, [300, 17, 1000, 1], torch.bfloat16, 16))
    batch = run_op(case)
    assert torch.equal(batch[case["rows"]], run_op(case, max_context=1024)[case["rows"]])
    for i in range(len(case["rows"])):
        alone = run_op(
            case,
            block_tables=case["block_tables"][i : i + 1],
            context_lens=case["context_lens"][i : i + 1],
            rows=case["rows"][i : i + 1],
            max_context=int(case["context_lens"][i]),
        )
        row = case["rows"][i]
        assert torch.equal(alone[row], batch[row])


def test_one_decode_graph_per_batch_size(loaded) -> None:  # type: ignore[no-untyped-def]
    runner = ModelRunner(loaded.model, 128, 16, max_num_seqs=8)
    assert runner.model.decode_kernel() == "triton"
    graphs = runner.decode_graphs
    assert graphs is not None and graphs.paged_attention
    assert graphs.context_blocks == [1024 // 16]
    assert runner.num_decode_graphs == 4  # batch sizes 1, 2, 4, 8
    assert graphs.buffers.k_gather.numel() == 0  # no gather buffers


def test_long_context_decode_logits_match_transformers(loaded) -> None:  # type: ignore[no-untyped-def]
    """Prefill 299 and 999 tokens, then one decode step each through the replayed graph."""
    runner = ModelRunner(loaded.model, 128, 16, max_num_seqs=4)
    prompts = [long_prompt(loaded, 300), long_prompt(loaded, 1000)]
    tables = [list(range(0, 19)), list(range(19, 19 + 63))]
    prefill = [ScheduledSeq(i, f"r{i}", p[:-1], 0, tables[i], False) for i, p in enumerate(prompts)]
    runner.execute(SchedulerOutput(prefill))
    decode = [
        ScheduledSeq(i, f"r{i}", p[-1:], len(p) - 1, tables[i], True) for i, p in enumerate(prompts)
    ]
    got = runner.execute(SchedulerOutput(decode)).float()
    graphs = runner.decode_graphs
    assert graphs is not None and graphs.num_padded_steps == 1
    reference_model = load_model(str(DEFAULT_MODEL_DIR), device="cuda", dtype="float32").model
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            ref = reference_model(torch.tensor([prompt], device=CUDA)).logits[0, -1]
        err = (got[i] - ref).abs().max().item()
        assert err < LOGIT_TOLERANCE[loaded.dtype], (len(prompt), err)


JOBS: list[tuple[str, dict[str, Any]]] = [
    ("long", {"max_new_tokens": 24}),  # greedy over a 300-token prompt
    ("short", {"max_new_tokens": 20, "do_sample": True, "top_k": 40, "top_p": 0.9, "seed": 7}),
    ("short", {"max_new_tokens": 12, "num_beams": 3}),
    ("short", {"max_new_tokens": 16, "num_return_sequences": 2, "do_sample": True, "seed": 3}),
    ("prefix", {"max_new_tokens": 16}),  # shares its first 64 tokens with the next one,
    ("prefix2", {"max_new_tokens": 16, "do_sample": True, "seed": 11}),  # added once r4 runs
]


def run_jobs(loaded, **config: Any) -> tuple[dict[str, list[list[int]]], LLMEngine]:  # type: ignore[no-untyped-def]
    prompts = {
        "long": long_prompt(loaded, 300),
        "short": loaded.tokenizer.encode("모든 국민은"),
        "prefix": long_prompt(loaded, 64) + loaded.tokenizer.encode("헌법"),
        "prefix2": long_prompt(loaded, 64) + loaded.tokenizer.encode("국회는"),
    }
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(num_blocks=512, block_size=16, max_num_seqs=8, **config),
    )

    def add(i: int) -> None:
        kind, options = JOBS[i]
        params = resolve_sampling_params(options, {}, 1024, len(prompts[kind]))
        engine.add_request(f"r{i}", prompts[kind], params)

    last = len(JOBS) - 1
    for i in range(last):
        add(i)
    tokens: dict[str, list[list[int]]] = {}
    while engine.has_unfinished():
        if "r4" in tokens and f"r{last}" not in tokens:  # r4's prompt blocks are cached now
            add(last)
            tokens[f"r{last}"] = [[]]
        for out in engine.step():
            assert out.error is None, out.error
            seqs = tokens.setdefault(out.request_id, [[] for _ in out.outputs])
            for j, seq in enumerate(out.outputs):
                seqs[j] += seq.token_ids
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks
    return tokens, engine


def test_graphs_give_the_eager_tokens_for_every_lane(loaded) -> None:  # type: ignore[no-untyped-def]
    graphed, engine = run_jobs(loaded)
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.paged_attention and graphs.num_padded_steps > 10
    assert engine.kv.prefix_hits > 0  # the second prefix request reused cached blocks
    assert all(tokens and all(tokens) for tokens in graphed.values())
    # The same padded step with the same kernels, run eagerly: replays compute exactly it.
    padded, _ = run_jobs(loaded, enforce_eager=True, static_decode=True)
    assert graphed == padded
    # A seeded request repeats itself.
    again, _ = run_jobs(loaded)
    assert again["r1"] == graphed["r1"] and again["r3"] == graphed["r3"]


def test_greedy_agrees_with_the_gather_path(loaded) -> None:  # type: ignore[no-untyped-def]
    """Gather + SDPA over context buckets (native_kernels=off): the attention before #22.
    Half precision can flip a near-tie argmax late; the start must agree."""
    graphed, _ = run_jobs(loaded)
    gathered, engine = run_jobs(loaded, native_kernels="off")
    graphs = engine.runner.decode_graphs
    assert graphs is not None and not graphs.paged_attention and len(graphs.context_blocks) > 1
    for request_id in ("r0", "r4"):  # the greedy requests
        got, ref = graphed[request_id][0], gathered[request_id][0]
        first = next((k for k, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
        assert first is None or first >= 8, (request_id, got, ref)


def test_kv_pool_sized_from_free_memory_counts_the_decode_graphs() -> None:
    state = build_state(Settings(device="cuda", gpu_memory_utilization=0.5))
    sizing = state.kv_sizing
    assert sizing is not None and sizing.source == "gpu_memory_utilization"
    assert sizing.decode_graphs is not None and sizing.decode_graphs > 0
    assert sizing.weights and sizing.weights > 0 and sizing.activation_peak
    _free, total = torch.cuda.mem_get_info()
    used = sizing.kv_bytes + sizing.weights + sizing.activation_peak + sizing.decode_graphs
    assert used + (sizing.non_torch or 0) <= 0.5 * total


def test_the_forward_itself_never_waits_for_the_gpu(loaded) -> None:  # type: ignore[no-untyped-def]
    """Under torch.cuda.set_sync_debug_mode("error") any synchronizing call raises: the padded
    decode's input copy (one non-blocking copy from pinned memory in DecodeBuffers.fill), the
    decode itself (eager, and replayed with its logits copied out) and the varlen forward
    over a step built beforehand have none. (build_step_input's .to(device) copies come
    before; the sampler's one read follows the forward: see the next test.)"""
    runner = ModelRunner(loaded.model, 64, 16, max_num_seqs=4)
    prompts = [long_prompt(loaded, 200), long_prompt(loaded, 37)]
    tables = [list(range(0, 13)), list(range(13, 16))]
    runner.execute(
        SchedulerOutput(
            [ScheduledSeq(i, f"r{i}", p, 0, tables[i], True) for i, p in enumerate(prompts)]
        )
    )
    seqs = [SeqChunk([5], len(p), tables[i]) for i, p in enumerate(prompts)]
    graphs = runner.decode_graphs
    assert graphs is not None
    shape = graphs.shape_for(seqs)
    assert shape is not None
    step = build_step_input(
        seqs, 16, runner.device, max_positions=1024, paged_decode=runner.model.paged_decode
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = graphs.prepare(seqs, shape)
        graphs.run(shape, rows)  # replay + a copy of the sampled rows' logits
        decode_forward(runner.model, runner.kv_cache, graphs.buffers, shape)
        runner.model(step, runner.kv_cache)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# A decode step's rows: greedy only, and sampling mixed with log-probs.
decode_jobs = pytest.mark.parametrize(
    "jobs",
    [
        [{"do_sample": False}] * 3,
        [
            {"do_sample": True, "top_k": 20, "top_p": 0.9, "seed": 3},
            {"do_sample": False, "top_n_tokens": 3},
            {"do_sample": True, "temperature": 0.7, "top_k": 5},
        ],
    ],
    ids=["greedy", "mixed"],
)
DECODE_TABLES = [list(range(8 * i, 8 * i + 8)) for i in range(3)]


@dataclass
class DecodeSetup:
    """Three prompts prefilled on a fresh runner, and each one's sampler row for `jobs`."""

    runner: ModelRunner
    sampler: Sampler
    prompts: list[list[int]]
    chunk: list[tuple[Any, ...]]

    def decode(self, ids: list[int]) -> SchedulerOutput:
        """One decode token per prompt (`ids`)."""
        return SchedulerOutput(
            [
                ScheduledSeq(i, f"r{i}", [ids[i]], len(p), DECODE_TABLES[i], True)
                for i, p in enumerate(self.prompts)
            ]
        )


def decode_setup(loaded, jobs: list[dict[str, Any]], tokens: list[int]) -> DecodeSetup:  # type: ignore[no-untyped-def]
    runner = ModelRunner(loaded.model, 64, 16, max_num_seqs=4)
    prompts = [long_prompt(loaded, n) for n in (40, 17, 90)]
    runner.execute(
        SchedulerOutput(
            [ScheduledSeq(i, f"r{i}", p, 0, DECODE_TABLES[i], True) for i, p in enumerate(prompts)]
        )
    )
    rows = []
    for job, p, token in zip(jobs, prompts, tokens, strict=True):
        params = resolve_sampling_params(job, {"eos_token_id": 1}, 1024, len(p))
        gen = make_generator(params.seed, CUDA) if params.seed is not None else None
        rows.append(SamplingRow.from_params(params, [*p, token], len(p), gen))
    sampler = Sampler(torch.Generator(device=CUDA).manual_seed(0))
    return DecodeSetup(runner, sampler, prompts, [(None, [None] * 3, rows, [0, 1, 2])])


@contextmanager
def counted_syncs() -> Iterator[list[int]]:
    """Synchronizing CUDA calls made inside (torch's sync debug mode, "warn"): the count is
    in the yielded list once the block ends."""
    count: list[int] = []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode(0)
    count.append(sum("synchronizing CUDA operation" in str(w.message) for w in caught))


@decode_jobs
def test_a_decode_step_syncs_once(loaded, jobs: list[dict[str, Any]]) -> None:  # type: ignore[no-untyped-def]
    """A whole decode step (padded inputs in, graph replay, the batched sampler call, its
    results out) makes one synchronizing call: the copy back of tokens, log-probs and checks
    (tests/unit/test_host_syncs.py counts every transfer, syncing or not, on fake CUDA)."""
    setup = decode_setup(loaded, jobs, [5, 5, 5])
    decode = setup.decode([5, 5, 5])
    counted: list[int] = []
    for _ in range(2):
        with counted_syncs() as count:
            logits = setup.runner.execute_step(decode).logits
            picks = sample_chunk(setup.sampler, logits, setup.chunk)
        counted += count
        assert len(picks) == 3
    graphs = setup.runner.decode_graphs
    assert graphs is not None and graphs.num_padded_steps == 2
    assert counted == [1, 1]  # the first step's staged settings go non-blocking: no sync


@decode_jobs
def test_an_overlapped_decode_step_never_syncs(loaded, jobs: list[dict[str, Any]]) -> None:  # type: ignore[no-untyped-def]
    """Async scheduling's worker job: the decode step with the previous step's tokens handed
    over on the device (`handed_off`), the graph replay and the sampler call launched
    (`Sampler.launch`) make no synchronizing call at all; its results come back later
    (`SampleLaunch.finish`) and equal the synchronous step's for the same tokens."""
    previous = [5, 9, 12]  # step k's tokens
    setup = decode_setup(loaded, jobs, previous)
    logits = setup.runner.execute_step(setup.decode(previous)).logits
    want = sample_chunk(setup.sampler, logits, setup.chunk)
    setup = decode_setup(loaded, jobs, previous)
    handed_off = torch.tensor(previous[::-1], device=CUDA)  # on the device, in its own order
    marked = [handed_off_id(2 - i) for i in range(3)]
    with counted_syncs() as count:
        result = setup.runner.execute_step(setup.decode(marked), handed_off=handed_off)
        launch = launch_chunk(setup.sampler, result.logits, setup.chunk)
    assert count == [0]
    assert generated_tokens(launch.finish()) == want
    graphs = setup.runner.decode_graphs
    assert graphs is not None and graphs.num_padded_steps == 1
