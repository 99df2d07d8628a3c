"""The Triton paged decode attention (issue #22), on CPU through Triton's interpreter.

``torch.ops.kogpt.paged_decode_attention`` (app/modeling/paged_attention_op.py, launching
app/modeling/triton_attention.py) against float64 SDPA over the gathered slots, in float32,
float16, bfloat16 and float64, on scattered block tables with the C kernel's edge cases
(contexts of 1, B - 1, B, B + 1 positions, several splits, the longest context) and block
sizes 1 to 32; against the C kernel itself; a row's result does not depend on its batch or
the launch's split count; rows it is not asked for are not written; bad arguments are
refused before any launch; and the kernels compile for Ampere and Hopper GPUs (Triton's
bundled ptxas, no GPU needed). The forward and the padded decode on top of it:
tests/unit/test_static_decode.py; under fake CUDA: tests/unit/test_device_placement.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.modeling import native
from app.modeling.paged_attention_op import paged_decode_attention
from tests.unit.triton_interpret import interpreted_kernels, needs_triton

__all__ = ["interpreted_kernels"]  # the fixture, used by name
ROOT = Path(__file__).resolve().parents[2]

# The C kernel's edge cases (tests/unit/test_native_kernels.py) at B = 16: one position,
# B - 1, B, B + 1, several splits of the Triton kernel (128 positions each), the longest.
CONTEXTS = [1, 15, 16, 17, 300, 1000]
# Against float64 SDPA over the same (rounded) inputs: the kernel accumulates in float32
# (float64 for float64), so the error is the output's own rounding and float32 sums.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def make_case(
    seed: int,
    contexts: list[int],
    dtype: torch.dtype,
    block_size: int,
    n_head: int = 12,
    head_dim: int = 64,
    table_dtype: torch.dtype = torch.int32,
) -> dict:
    """q as a view of a fused qkv buffer (rows in shuffled order, one spare row), K/V on
    scattered blocks, tables padded with their last id to one width."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-c // block_size) for c in contexts]
    num_blocks = sum(per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for nb in per_seq:
        tables.append(perm[at : at + nb])
        at += nb
    width = max(per_seq) + 1
    padded = [t + [t[-1]] * (width - len(t)) for t in tables]
    slots = num_blocks * block_size
    k_cache = torch.randn(slots, n_head, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(slots, n_head, head_dim, generator=g).to(dtype)
    n_rows = len(contexts) + 1
    embd = n_head * head_dim
    qkv = torch.randn(n_rows, 3 * embd, generator=g).to(dtype)
    q = qkv[:, :embd].view(n_rows, n_head, head_dim)
    rows = torch.randperm(n_rows, generator=g)[: len(contexts)]
    return {
        "q": q,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": torch.tensor(padded, dtype=table_dtype),
        "context_lens": torch.tensor(contexts, dtype=table_dtype),
        "rows": rows,
        "block_size": block_size,
        "max_context": max(contexts),
        "scale": head_dim**-0.5,
    }


def run(case: dict, **changes: object) -> torch.Tensor:
    """The op's output rows (every row first set to NaN: a row not written stays NaN)."""
    args = case | changes
    out = torch.full_like(args["q"], float("nan"), memory_format=torch.contiguous_format)
    paged_decode_attention(
        args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["context_lens"],
        args["rows"], out, args["block_size"], args["max_context"], args["scale"],
    )  # fmt: skip
    return out


def reference(case: dict) -> torch.Tensor:
    """[n, H, hd] float64: per sequence its slots gathered one by one, then SDPA."""
    B, out = case["block_size"], []
    q_rows = case["q"] if case["rows"] is None else case["q"][case["rows"]]
    for i, n in enumerate(case["context_lens"].tolist()):
        table = case["block_tables"][i].tolist()
        slots = torch.tensor([table[p // B] * B + p % B for p in range(n)])
        keys = case["k_cache"][slots].transpose(0, 1).double()  # [H, n, hd]
        values = case["v_cache"][slots].transpose(0, 1).double()
        query = q_rows[i].double().unsqueeze(1)  # [H, 1, hd]
        o = F.scaled_dot_product_attention(query, keys, values, scale=case["scale"])
        out.append(o.squeeze(1))
    return torch.stack(out)


def check_against_reference(case: dict, dtype: torch.dtype) -> torch.Tensor:
    out = run(case)
    rows = case["rows"]
    got = out[rows].double()
    err = (got - reference(case)).abs().max().item()
    assert err < TOLERANCE[dtype], err
    unasked = torch.ones(out.shape[0], dtype=torch.bool)
    unasked[rows] = False
    assert out[unasked].isnan().all()  # rows not asked for are not written
    return out


@pytest.mark.usefixtures("interpreted_kernels")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
def test_matches_sdpa(dtype: torch.dtype) -> None:
    # GPT-2's 12 heads x 64 in float32; 4 heads elsewhere (the interpreter is slow).
    heads = 12 if dtype == torch.float32 else 4
    check_against_reference(make_case(0, CONTEXTS, dtype, 16, n_head=heads), dtype)


@pytest.mark.usefixtures("interpreted_kernels")
@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_matches_sdpa_for_other_block_sizes(block_size: int) -> None:
    contexts = [1, block_size - 1 or 1, block_size, block_size + 1, 129, 300]
    case = make_case(block_size, contexts, torch.float32, block_size, n_head=2, head_dim=64)
    check_against_reference(case, torch.float32)


@pytest.mark.usefixtures("interpreted_kernels")
def test_a_head_dim_below_a_power_of_two_is_masked() -> None:
    case = make_case(3, [5, 40, 200], torch.float32, 16, n_head=3, head_dim=48)
    check_against_reference(case, torch.float32)


@pytest.mark.usefixtures("interpreted_kernels")
def test_matches_the_native_cpu_kernel() -> None:
    lib, why = native.load_kernels()
    if lib is None:
        pytest.skip(f"native kernels unavailable: {why}")
    case = make_case(4, CONTEXTS, torch.float32, 16, n_head=4)
    out = run(case)
    expected = torch.full_like(out, float("nan"))
    native.paged_decode_attention(
        case["q"], case["k_cache"], case["v_cache"], case["block_tables"], case["context_lens"],
        case["rows"], expected, 16, case["max_context"], case["scale"],
    )  # fmt: skip
    assert (out[case["rows"]] - expected[case["rows"]]).abs().max().item() < 2e-6


@pytest.mark.usefixtures("interpreted_kernels")
def test_a_row_gets_the_same_bits_in_any_batch_and_launch() -> None:
    """Split boundaries depend on positions only: a row alone, in a batch, or launched with
    more splits than it needs gives identical bits (batch invariance of decode)."""
    case = make_case(5, [300, 17, 1000, 1], torch.bfloat16, 16, n_head=2)
    batch = run(case)
    wider = run(case, max_context=1024)
    assert torch.equal(batch[case["rows"]], wider[case["rows"]])
    for i in range(len(case["rows"])):
        alone = run(
            case,
            block_tables=case["block_tables"][i : i + 1],
            context_lens=case["context_lens"][i : i + 1],
            rows=case["rows"][i : i + 1],
            max_context=int(case["context_lens"][i]),
        )
        row = case["rows"][i]
        assert torch.equal(alone[row], batch[row])


@pytest.mark.usefixtures("interpreted_kernels")
def test_without_rows_query_i_is_row_i() -> None:
    """The padded decode's call: int64 tables and lengths, row i of q for table i."""
    case = make_case(6, [33, 1, 160], torch.float16, 16, n_head=4, table_dtype=torch.int64)
    n = len(case["rows"])
    case["q"] = case["q"][case["rows"]]  # query i in row i
    case["rows"] = None
    out = run(case)
    assert out.shape[0] == n
    err = (out.double() - reference(case)).abs().max().item()
    assert err < TOLERANCE[torch.float16], err


def test_bad_arguments_are_refused_before_any_launch() -> None:
    case = make_case(7, [3, 20], torch.float32, 4, n_head=2, head_dim=8)
    with pytest.raises(ValueError, match="block_tables is on meta"):
        run(case, block_tables=case["block_tables"].to("meta"))
    with pytest.raises(ValueError, match="one floating dtype"):
        run(case, k_cache=case["k_cache"].double(), v_cache=case["v_cache"].double())
    with pytest.raises(ValueError, match=r"rows \(3,\) must be \[2\]"):
        run(case, rows=torch.arange(3))
    with pytest.raises(ValueError, match="do not match q"):
        run(case, k_cache=case["k_cache"][:, :1], v_cache=case["v_cache"][:, :1])
    with pytest.raises(ValueError, match="not a power of 2"):
        run(case, block_size=3)
    with pytest.raises(ValueError, match="unit stride"):
        run(case, q=case["q"].transpose(1, 2).contiguous().transpose(1, 2))


# Run in a fresh interpreter without TRITON_INTERPRET: this session's kernels may be the
# interpreted ones (tests/conftest.py), and @triton.jit decides once, at import.
COMPILE_SCRIPT = """
import sys, torch
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from app.modeling import triton_attention as kernels
assert isinstance(kernels._split_kernel, JITFunction)
for arch, dtype in ((90, torch.bfloat16), (90, torch.float16), (90, torch.float32),
                    (80, torch.bfloat16)):
    for table_dtype, has_rows in ((torch.int32, True), (torch.int64, False)):
        built = kernels.compile_for(GPUTarget("cuda", arch, 32), dtype, table_dtype, has_rows)
        assert len(built) == 2 and all(len(k.asm["cubin"]) > 0 for k in built)
        print("built", arch, dtype, table_dtype, [len(k.asm["cubin"]) for k in built])
"""


def test_kernels_compile_for_gpus() -> None:
    """Both launches the model makes (the varlen forward: int32 tables and a rows tensor;
    the padded decode: int64 tables, no rows) compile to a cubin for sm_90 in bfloat16,
    float16 and float32 and for sm_80 in bfloat16, with GPT-2's head size and the default
    block size."""
    needs_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("built ") == 8, result.stdout
