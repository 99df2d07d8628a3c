"""Micro-benchmark of one decode step's matmuls per backend (a script, never a test).

    python -m tests.benchmarks.linear_micro [--model DIR] [--rows 1,16,64,256] [--threads 1]

For each row count (sequences decoding one token), the matmuls of one step as the paged
forward runs them (app/modeling/linear.py): c_attn, attn c_proj, c_fc, mlp c_proj of every
layer ("blocks"), and the LM head on its own. Backends: aten (torch's own matmul), mkldnn
(oneDNN, prepacked float32) and int8 (dynamic int8, fbgemm). Inputs are random (the
content does not change the work). Printed: the best of ``--repeat`` interleaved runs, in
ms, and int8's speed-up over mkldnn. On a shared machine compare ratios, not times.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from app.modeling.linear import GPT2Linears, build_linears
from app.modeling.loader import load_model

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("aten", "mkldnn", "int8")


def best_of(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Best seconds of each fn over `repeat` interleaved runs (after one warm-up each)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def block_matmuls(lin: GPT2Linears, x: torch.Tensor) -> None:
    """Every layer's matmuls (c_attn, attn c_proj, c_fc, mlp c_proj) on `x` [rows, n_embd],
    without the attention or elementwise work between them: the "linear-layer bound" of the
    engine benchmark and forward_micro too."""
    for block in lin.blocks:
        block.qkv(x)
        block.attn_proj(x)
        block.mlp_proj(block.fc(x))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "kogpt2-base-random"))
    parser.add_argument("--rows", default="1,16,64,256")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype="float32").model
    tr, cfg = model.transformer, model.config
    linears = {
        name: build_linears(
            tr.h,
            model.lm_head,
            "aten" if name == "int8" else name,  # type: ignore[arg-type]
            "cpu",
            torch.float32,
            quantize="int8" if name == "int8" else "none",
        )
        for name in BACKENDS
    }
    print(
        f"{Path(args.model).name}: {cfg.n_layer} layers, {cfg.n_embd} wide, vocab "
        f"{cfg.vocab_size}; {torch.get_num_threads()} thread(s); best of {args.repeat}, ms"
    )
    print(f"{'rows':>5} {'part':7}" + "".join(f"{b:>9}" for b in BACKENDS) + "  mkldnn/int8")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, cfg.n_embd, generator=gen)
            parts = {
                "blocks": [(lambda lin=linears[b], x=x: block_matmuls(lin, x)) for b in BACKENDS],
                "lm_head": [(lambda lin=linears[b], x=x: lin.lm_head(x)) for b in BACKENDS],
            }
            for part, fns in parts.items():
                times = dict(zip(BACKENDS, best_of(fns, args.repeat), strict=True))
                cells = "".join(f"{times[b] * 1e3:9.2f}" for b in BACKENDS)
                print(f"{rows:5d} {part:7}{cells}  {times['mkldnn'] / times['int8']:8.2f}x")


if __name__ == "__main__":
    main()
