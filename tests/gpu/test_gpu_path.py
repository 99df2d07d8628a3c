"""The CUDA serving path (issue #11). Marked `gpu`; skipped where torch sees no CUDA device.

Run on a GPU host with `python -m pytest -m gpu tests/gpu -q`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from app.config import Settings
from app.engine.core.scheduler import ScheduledSeq, SchedulerOutput
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.model_runner import ModelRunner
from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.kv_sizing import KVSizingError, resolve_kv_sizing
from app.modeling.loader import DEFAULT_MODEL_DIR, load_model
from app.options.resolve import resolve_sampling_params
from app.state import build_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = ["대한민국은 민주공화국이다.", "모든 국민은", "헌법", "국회는 법률을 제정한다. 대통령은"]
# fp16 logits of a 4-layer model against transformers' own fp16 forward: the two differ by
# kernel choice and summation order only.
FP16_LOGIT_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    return load_model(str(DEFAULT_MODEL_DIR), device="cuda", dtype="float16")


def test_dtype_auto_picks_half_precision() -> None:
    auto = load_model(str(DEFAULT_MODEL_DIR), device="cuda", dtype="auto")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert auto.dtype == expected


def test_paged_logits_match_transformers_fp16(loaded) -> None:  # type: ignore[no-untyped-def]
    model: GPT2LMHeadModel = loaded.model
    paged = PagedGPT2.from_hf(model)
    ids = [loaded.tokenizer.encode(p) for p in PROMPTS]
    blocks_per_seq = -(-max(map(len, ids)) // 16)
    kv = KVCache.allocate(model.config, blocks_per_seq * len(ids), 16, paged.dtype, paged.device)
    chunks = [
        SeqChunk(seq, 0, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), True, True)
        for i, seq in enumerate(ids)
    ]
    ours = paged(build_step_input(chunks, 16, paged.device), kv).float()
    offset = 0
    for seq in ids:
        with torch.inference_mode():
            ref = model(torch.tensor([seq], device="cuda")).logits[0].float()
        got = ours[offset : offset + len(seq)]
        offset += len(seq)
        assert (got - ref).abs().max().item() < FP16_LOGIT_TOLERANCE


def test_greedy_output_matches_generate(loaded) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(num_blocks=256, block_size=16))
    ids = [loaded.tokenizer.encode(p) for p in PROMPTS]
    for i, prompt in enumerate(ids):
        params = resolve_sampling_params({"max_new_tokens": 24}, {}, 1024, len(prompt))
        engine.add_request(f"r{i}", prompt, params)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():  # outputs carry deltas
            outputs.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    for i, prompt in enumerate(ids):
        with torch.inference_mode():
            ref = loaded.model.generate(
                torch.tensor([prompt], device="cuda"), max_new_tokens=24, do_sample=False
            )[0, len(prompt) :].tolist()
        # fp16 can flip a near-tie argmax; the prefix before any flip must agree exactly.
        got = outputs[f"r{i}"]
        agree = next((k for k, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
        assert agree is None or agree >= 8, (got, ref)
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks  # no leak after the burst


def test_kv_pool_sized_from_free_gpu_memory() -> None:
    state = build_state(Settings(device="cuda", gpu_memory_utilization=0.5))
    sizing = state.kv_sizing
    assert sizing is not None and sizing.source == "gpu_memory_utilization"
    _free, total = torch.cuda.mem_get_info()
    assert sizing.kv_bytes <= 0.5 * total
    assert sizing.weights and sizing.activation_peak is not None


def test_oversized_kv_pool_fails_with_the_setting_to_change() -> None:
    loaded = load_model(str(DEFAULT_MODEL_DIR), device="cuda", dtype="float16")
    per_block = KVCache.block_bytes(loaded.config, 16, loaded.dtype)
    _free, total = torch.cuda.mem_get_info()
    too_many = 2 * total // per_block
    with pytest.raises(KVSizingError, match="--num-kv-blocks"):
        build_state(Settings(device="cuda", dtype="float16", num_kv_blocks=too_many))
    with pytest.raises(KVSizingError, match="--gpu-memory-utilization"):
        resolve_kv_sizing(
            Settings(device="cuda", gpu_memory_utilization=0.001), PagedGPT2.from_hf(loaded.model)
        )


# -- CUDA graphs of decode steps ----------------------------------------------------------


def run_greedy(loaded, **config) -> tuple[dict[str, list[int]], LLMEngine]:  # type: ignore[no-untyped-def]
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(num_blocks=256, block_size=16, max_num_seqs=8, **config),
    )
    for i, text in enumerate(PROMPTS):
        prompt = loaded.tokenizer.encode(text)
        params = resolve_sampling_params({"max_new_tokens": 32}, {}, 1024, len(prompt))
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks
    return tokens, engine


def test_cuda_graph_replay_gives_the_eager_padded_tokens(loaded) -> None:  # type: ignore[no-untyped-def]
    graphed, engine = run_greedy(loaded)
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.graphs and graphs.num_padded_steps > 20
    # The same padded forward without capture: replays must compute exactly it.
    padded, _ = run_greedy(loaded, enforce_eager=True, static_decode=True)
    assert graphed == padded
    # The varlen forward (fp16: a near-tie may flip late; the start must agree).
    eager, plain = run_greedy(loaded, enforce_eager=True)
    assert plain.runner.num_decode_graphs == 0
    for request_id, tokens in eager.items():
        got = graphed[request_id]
        first = next((k for k, (a, b) in enumerate(zip(got, tokens, strict=False)) if a != b), None)
        assert first is None or first >= 16, (got, tokens)
    timer = engine.runner.step_timer
    assert timer.num_forwards > 0 and timer.busy_seconds > 0  # CUDA events were read


def test_async_scheduling_gives_the_synchronous_tokens(loaded) -> None:  # type: ignore[no-untyped-def]
    """auto is on for CUDA: steps overlap on the worker thread (graph replays there) and
    the tokens equal the synchronous engine's, graphs in both."""
    overlapped, engine = run_greedy(loaded)
    assert engine.async_scheduling and engine.num_overlapped_steps > 20
    synchronous, sync_engine = run_greedy(loaded, async_scheduling="off")
    assert sync_engine.num_overlapped_steps == 0
    assert overlapped == synchronous


def test_cuda_graph_logits_match_the_varlen_forward(loaded) -> None:  # type: ignore[no-untyped-def]
    graphed = ModelRunner(loaded.model, 64, 16, max_num_seqs=8)
    eager = ModelRunner(loaded.model, 64, 16, max_num_seqs=8, enforce_eager=True)
    ids = [loaded.tokenizer.encode(p) for p in PROMPTS]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(ids))]
    prefill = SchedulerOutput(
        [ScheduledSeq(i, f"r{i}", seq, 0, tables[i], True) for i, seq in enumerate(ids)]
    )
    for runner in (graphed, eager):
        runner.execute(prefill)
    decode = SchedulerOutput(
        [ScheduledSeq(i, f"r{i}", [7 + i], len(seq), tables[i], True) for i, seq in enumerate(ids)]
    )
    got, expected = graphed.execute(decode).float(), eager.execute(decode).float()
    assert graphed.decode_graphs is not None and graphed.decode_graphs.num_padded_steps == 1
    assert (got - expected).abs().max().item() < FP16_LOGIT_TOLERANCE


def test_capture_logs_progress(loaded, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="kogpt.engine")
    runner = ModelRunner(loaded.model, 64, 16, max_num_seqs=8)
    total = runner.num_decode_graphs
    # The Triton paged attention: one graph per batch size (1, 2, 4, 8), every context.
    assert runner.model.decode_kernel() == "triton" and total == 4
    progress = [r.getMessage() for r in caplog.records if "decode graphs (batch" in r.getMessage()]
    assert len(progress) >= 2 and progress[-1].startswith(f"captured {total}/{total} ")
