"""The matmul backends of the paged forward (app/modeling/linear.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from app.modeling.gpt2 import PagedGPT2
from app.modeling.linear import (
    AtenConv1D,
    MkldnnPacked,
    build_linears,
    mkldnn_available,
    resolve_linear_backend,
)

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
