"""The matmul backends of the paged forward (app/modeling/linear.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import GPT2Config, GPT2LMHeadModel

from app.config import Settings
from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.linear import (
    AtenConv1D,
    Int8Dynamic,
    MkldnnPacked,
    build_linears,
    check_quantize,
    mkldnn_available,
    resolve_linear_backend,
)
from tests.unit.test_engine import make_engine, run_all

needs_mkldnn = pytest.mark.skipif(not mkldnn_available(), reason="torch built without oneDNN")
CPU = torch.device("cpu")


def test_auto_picks_mkldnn_only_for_float32_on_cpu() -> None:
    want = "mkldnn" if mkldnn_available() else "aten"
    assert resolve_linear_backend("auto", CPU, torch.float32) == want
    assert resolve_linear_backend("auto", CPU, torch.float64) == "aten"
    assert resolve_linear_backend("auto", torch.device("cuda"), torch.float16) == "aten"
    assert resolve_linear_backend("aten", CPU, torch.float32) == "aten"


def test_mkldnn_refused_where_it_does_not_apply() -> None:
    with pytest.raises(ValueError, match="float32 on CPU"):
        resolve_linear_backend("mkldnn", CPU, torch.float64)
    with pytest.raises(ValueError, match="linear_backend must be"):
        resolve_linear_backend("blas", CPU, torch.float32)  # type: ignore[arg-type]


@needs_mkldnn
@pytest.mark.parametrize("rows", [1, 3, 64, 65, 300])
def test_packed_equals_addmm_at_any_row_count(rows: int) -> None:
    """Packed for MKLDNN_PACK_ROWS rows, correct for every row count (rounding only)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 200, generator=g) * 0.1  # Conv1D layout [in, out]
    b = torch.randn(200, generator=g)
    x = torch.randn(rows, 96, generator=g)
    want = AtenConv1D(w, b)(x)
    got = MkldnnPacked(w.t(), b)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = torch.empty(rows, 200)
    assert MkldnnPacked(w.t(), b)(x, out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def _tiny() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


@needs_mkldnn
def test_build_linears_covers_every_block_and_the_head() -> None:
    model = _tiny()
    tr = model.transformer
    lin = build_linears(tr.h, model.lm_head, "auto", CPU, torch.float32)
    assert lin.backend == "mkldnn" and len(lin.blocks) == 2
    x = torch.randn(5, 48)
    block = tr.h[1]
    torch.testing.assert_close(lin.blocks[1].qkv(x), block.attn.c_attn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.blocks[1].fc(x), block.mlp.c_fc(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.lm_head(x), model.lm_head(x), rtol=1e-5, atol=1e-5)


def test_linears_follow_a_dtype_change() -> None:
    """Packed copies do not follow .to(); the forward rebuilds them for the new dtype."""
    model = _tiny()
    paged = PagedGPT2.from_hf(model)
    first = paged.linears()
    model.to(torch.float64)
    second = paged.linears()
    assert second is not first and second.backend == "aten"
    assert paged.linears() is second  # cached while nothing changes


# -- quantize=int8 ---------------------------------------------------------------------------


def int8_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case |int8 - float| per output of x @ w.T: weights rounded to half a step of
    their channel's scale (max |w| / 127), activations within one step of their per-call
    scale ((max(x, 0) - min(x, 0)) / 127: 7-bit, reduce_range; a full step, not half, since
    the zero point is rounded to an integer and can clip an extreme value)."""
    with_zero = torch.cat([x.flatten(), x.new_zeros(1)])  # the range always holds 0
    sx = (with_zero.max() - with_zero.min()) / 127
    sw = w.abs().amax(dim=1) / 127  # [out]
    return sx * w.abs().sum(1) + x.abs().sum(1, keepdim=True) * sw / 2 + sx * sw / 2 * x.shape[1]


@pytest.mark.parametrize("rows", [0, 1, 3, 64, 65, 300])
def test_int8_linear_within_its_quantization_error(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 96, generator=g) * 0.1  # [out, in]
    w[7] = 0  # an all-zero (pruned) channel: still a valid scale, output exactly the bias
    b = torch.randn(200, generator=g)
    x = torch.randn(rows, 96, generator=g)
    lin = Int8Dynamic(w, b)
    got = lin(x)
    assert got.shape == (rows, 200) and got.dtype == torch.float32
    want = (x.double() @ w.double().t() + b.double()).float()
    # Bound on the arithmetic, plus float32 rounding of the rescaled int32 sums. Without
    # reduce_range, AVX2's saturating int16 pair sums broke it (1.3-2.4x the bound).
    assert ((got - want).abs() <= int8_error_bound(x, w) + 1e-4).all()
    assert torch.equal(got[:, 7], b[7].expand(rows))
    out = torch.empty(rows, 200)
    assert lin(x, out=out) is out and torch.equal(out, got)


def test_int8_paged_forward_close_to_float32() -> None:
    """Logits of the whole paged forward: each int8 matmul errs by ~1-2% of its output's
    norm (7-bit activations), three in series per layer path: within 5% per row (2.7%
    measured), and the LM head's top token mostly unchanged."""
    model = _tiny()
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = {}
    for quantize in ("none", "int8"):
        paged = PagedGPT2.from_hf(model, "auto", quantize)
        kv = KVCache.allocate(model.config, 3, 16, torch.float32)
        step = build_step_input([SeqChunk(ids, 0, [2, 0, 1], all_logits=True)], 16, "cpu")
        logits[quantize] = paged(step, kv)
        want = "int8-fbgemm" if quantize == "int8" else ("mkldnn", "aten")
        assert paged.linears().backend in want
    fp32, int8 = logits["none"], logits["int8"]
    rel = (int8 - fp32).norm(dim=-1) / fp32.norm(dim=-1)
    assert 0 < rel.max() < 0.05  # > 0: the int8 path really ran
    assert (int8.argmax(-1) == fp32.argmax(-1)).double().mean() >= 0.9


def test_int8_refused_where_it_does_not_apply() -> None:
    model = _tiny()
    tr = model.transformer
    with pytest.raises(ValueError, match=r"quantize=int8 needs float32 on CPU"):
        build_linears(tr.h, model.lm_head, "auto", CPU, torch.float64, quantize="int8")
    with pytest.raises(ValueError, match=r"quantize=int8 needs float32 on CPU"):
        check_quantize("int8", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="quantize must be none or int8"):
        check_quantize("int4", CPU, torch.float32)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="quantize"):
        Settings(quantize="int4")  # type: ignore[arg-type]
    check_quantize("none", torch.device("cuda"), torch.float16)  # none applies everywhere


def test_int8_engine_fails_at_start_up_on_float64(tiny_model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="quantize=int8"):
        LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(num_blocks=8, quantize="int8"))


def test_int8_engine_greedy_generation_frees_every_block(tiny_model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(tiny_model).float()  # the fixture is float64
    engine = make_engine(model, tiny_tokenizer, quantize="int8")
    assert engine.runner.model.linears().backend == "int8-fbgemm"
    prompts = [tiny_tokenizer(p)["input_ids"] for p in ("대한민국은", "모든 국민은 " * 5)]
    jobs = [(p, {"max_new_tokens": 6, "min_new_tokens": 6}) for p in prompts]
    got = run_all(engine, jobs)  # asserts every KV block is free at the end
    assert [len(t) for t in got.values()] == [6, 6]
