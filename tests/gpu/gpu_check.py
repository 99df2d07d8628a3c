"""``make gpu-check``: the GPU path checked on a CUDA host, or its CPU dry run (issue #22).

    python -m tests.gpu.gpu_check [--dry-run] [--out PATH] [--skip-tests] [--repeat 7]

On a CUDA host:

1. tests/gpu (``pytest -m gpu``) in a subprocess; its summary line goes into the figures.
2. The decode-step benchmark on a random GPT-2 of kogpt2-base shape (12 layers, 768 wide,
   12 heads, vocab 51200; built in-process, seeded), in bfloat16 and float16. For batches of
   1, 16, 64 and 256 rows with contexts drawn around 300 tokens ("ragged"), and 64 rows of
   which one is at 1,000 tokens ("one long row"), the captured decode step
   (app/modeling/cuda_graphs.py, CUDA graph replay) with the Triton paged attention against
   the same step with gather + SDPA over its context bucket (the path before issue #22),
   and the step's matmuls alone (c_attn, c_proj, c_fc, mlp c_proj per layer and the LM head,
   also replayed as a graph). Per case: the median ms per step over interleaved rounds,
   the gather/Triton ratio, the step over its matmuls, and the largest logit difference
   between the two attention paths (which fails the check past ``LOGIT_TOLERANCE``).

3. The end-to-end benchmarks on the GPU in bfloat16 (``--skip-benchmarks`` leaves them out):
   the engine benchmark against transformers (continuous batching ``generate_batch`` and a
   static batch) at 1, 16, 64 and 256 concurrent, and the HTTP benchmark at 64 concurrent
   (tests/benchmarks/engine.py and http_load.py with ``--device cuda --dtype bfloat16``) on
   models/kogpt2-base-random (``make random-base``), writing their JSON and PNG under
   docs/benchmarks/gpu/; their return codes and output tails go into the figures. Then async
   scheduling on against off at 64 and 256 concurrent (tests/benchmarks/async_scheduling.py,
   its JSON there too): `auto` turns it on for CUDA, and this is its measurement.

Figures go to docs/benchmarks/gpu_check.json (or ``--out``) and a table is printed.

Without CUDA, or with ``--dry-run``: the same code at tiny sizes on CPU, eagerly (nothing is
captured), the Triton kernel through Triton's interpreter, one timed round, no tests/gpu, and
the end-to-end benchmarks' same command lines on the CPU at toy sizes on the embedded model.
Its figures go to ``--out`` (default: a temporary file), never to docs/: CPU timings of an
interpreted kernel mean nothing. tests/unit/test_gpu_check.py runs it in ``make test`` so
that this script cannot rot between GPU runs.
"""

from __future__ import annotations

import os
import sys

import torch

# The dry run's kernels go through Triton's interpreter: set before triton is imported
# (importing transformers' models imports it).
if "--dry-run" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from app.modeling.attention_metadata import SeqChunk
from app.modeling.cuda_graphs import DecodeGraphs
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.static_decode import context_buckets
from tests.benchmarks.linear_micro import block_matmuls

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "gpu_check.json"
BLOCK_SIZE = 16
# Largest |logit| difference allowed between the Triton and the gather + SDPA step: both
# accumulate in float32; the logits differ by the rounding of half-precision activations
# through 12 layers (the same bound tests/gpu uses against transformers).
LOGIT_TOLERANCE = {"bfloat16": 0.25, "float16": 0.05}

GPU_SHAPE = {"vocab_size": 51200, "n_positions": 1024, "n_embd": 768, "n_layer": 12}
GPU_SHAPE |= {"n_head": 12}
DRY_SHAPE = {"vocab_size": 300, "n_positions": 256, "n_embd": 32, "n_layer": 1, "n_head": 2}


@dataclass
class Case:
    name: str
    contexts: list[int]  # each row's context length, the new token included


@dataclass
class Figures:
    dtype: str
    case: str
    batch: int
    mean_context: float
    max_context: int
    gather_bucket_blocks: int  # the padded context the gather path attends, in blocks
    triton_ms: float
    gather_ms: float
    matmuls_ms: float
    gather_over_triton: float
    triton_over_matmuls: float
    max_logit_diff: float


def cases(dry_run: bool, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    if dry_run:
        return [
            Case("ragged", [1, 17, 100]),
            Case("one long row", [30, 200]),
        ]
    out = [Case("ragged", [rng.randint(200, 400) for _ in range(bs)]) for bs in (1, 16, 64, 256)]
    long = [rng.randint(200, 400) for _ in range(63)] + [1000]
    out.append(Case("one long row", long))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(fns: list[Callable[[], object]], device: torch.device, rounds: int,
                   per_round: int) -> list[float]:  # fmt: skip
    """Median ms per call of each fn over ``rounds`` interleaved rounds of ``per_round``
    calls (one warm-up round first)."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds + 1):
        for fn, ts in zip(fns, times, strict=True):
            sync(device)
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            sync(device)
            if r:  # round 0 warms up
                ts.append((time.perf_counter() - start) * 1e3 / per_round)
    return [statistics.median(ts) for ts in times]


def decode_seqs(contexts: list[int], block_size: int) -> tuple[list[SeqChunk], int]:
    """One decoding token per row on disjoint shuffled blocks; returns them and the number
    of blocks they use (the scratch block is the next one)."""
    rng = random.Random(len(contexts))
    per_row = [-(-c // block_size) for c in contexts]
    blocks = list(range(sum(per_row)))
    rng.shuffle(blocks)
    seqs, at = [], 0
    for c, nb in zip(contexts, per_row, strict=True):
        seqs.append(SeqChunk([rng.randrange(100)], c - 1, blocks[at : at + nb]))
        at += nb
    return seqs, len(blocks)


def bench_case(model: PagedGPT2, case: Case, rounds: int, per_round: int) -> Figures:
    device, dtype, B = model.device, model.dtype, BLOCK_SIZE
    seqs, used = decode_seqs(case.contexts, B)
    kv = KVCache.allocate(model.config, used + 1, B, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    for t in (*kv.keys, *kv.values):  # content does not change the work; finite, non-uniform
        t.normal_(generator=gen)
    bs = len(seqs)
    max_blocks = -(-model.n_positions // B)
    need = max(-(-c // B) for c in case.contexts)
    bucket = next(b for b in context_buckets(max_blocks) if b >= need)
    paths = {}
    for name, paged, buckets in (("triton", True, None), ("gather", False, [bucket])):
        graphs = DecodeGraphs(
            model, kv, bs, used, batch_sizes=[bs], context_blocks=buckets, paged_attention=paged
        )
        if device.type == "cuda":
            graphs.capture()
        shape = graphs.shape_for(seqs)
        assert shape is not None, (name, bs, need)
        rows = graphs.prepare(seqs, shape)
        paths[name] = (graphs, shape, rows)
    logits = {name: g.run(shape, rows).float() for name, (g, shape, rows) in paths.items()}
    diff = (logits["triton"] - logits["gather"]).abs().max().item()

    linears = model.linears()
    x = torch.randn(bs, model.n_embd, dtype=dtype, device=device)

    def matmuls() -> None:
        block_matmuls(linears, x)
        linears.lm_head(x)

    run_matmuls: Callable[[], object] = matmuls
    if device.type == "cuda":
        matmuls()  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            matmuls()
        run_matmuls = graph.replay
    fns = [lambda g=g, s=s, r=r: g.run(s, r) for g, s, r in paths.values()]
    triton_ms, gather_ms, matmuls_ms = interleaved_ms(
        [*fns, run_matmuls], device, rounds, per_round
    )
    return Figures(
        dtype=str(dtype).removeprefix("torch."),
        case=case.name,
        batch=bs,
        mean_context=round(statistics.mean(case.contexts), 1),
        max_context=max(case.contexts),
        gather_bucket_blocks=bucket,
        triton_ms=round(triton_ms, 4),
        gather_ms=round(gather_ms, 4),
        matmuls_ms=round(matmuls_ms, 4),
        gather_over_triton=round(gather_ms / triton_ms, 3),
        triton_over_matmuls=round(triton_ms / matmuls_ms, 3),
        max_logit_diff=diff,
    )


def run_gpu_tests() -> dict[str, object]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"]
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    print(result.stdout[-4000:], result.stderr[-2000:], sep="\n")
    return {
        "command": " ".join(cmd[1:]),
        "returncode": result.returncode,
        "summary": lines[-1] if lines else "",
        "seconds": round(time.monotonic() - started, 1),
    }


# Engine benchmark rows that cannot or need not run on a GPU: CTranslate2 and int8 (CPU only),
# batch-invariant mode (float32 CPU only), the CPU kernel and matmul variants, and the
# sequential generate baseline (minutes; continuous batching is the comparison).
GPU_SKIP = "ct2,sequential,int8,no-native,aten,batch-invariant"


def benchmark_commands(dry_run: bool, out_dir: Path) -> dict[str, list[str]]:
    """The engine and HTTP benchmarks' command lines: the GPU run's, or (dry run) the same
    scripts on the CPU at toy sizes, so that a GPU run finds them working."""
    engine = [sys.executable, "-m", "tests.benchmarks.engine", "--out", str(out_dir)]
    http = [sys.executable, "-m", "tests.benchmarks.http_load", "--out", str(out_dir)]
    overlap = [sys.executable, "-m", "tests.benchmarks.async_scheduling", "--out", str(out_dir)]
    if dry_run:
        toy = ["--model", str(ROOT / "models" / "kogpt2-mini"), "--device", "cpu"]
        engine += [*toy, "--concurrency", "2", "--new-tokens", "2", "--rounds", "1"]
        engine += ["--skip", GPU_SKIP]
        http += [*toy, "--concurrency", "2", "--min-requests", "2"]
        http += ["--prompt-tokens", "4,8", "--new-tokens", "2,4"]
        overlap += [*toy, "--concurrency", "2", "--new-tokens", "3", "--repeats", "1"]
    else:
        gpu = ["--model", str(ROOT / "models" / "kogpt2-base-random"), "--device", "cuda"]
        gpu += ["--dtype", "bfloat16"]
        engine += [*gpu, "--concurrency", "1,16,64,256", "--skip", GPU_SKIP]
        http += [*gpu, "--concurrency", "64"]
        # Async scheduling on / off (auto turns it on for CUDA on an expectation: this measures it).
        overlap += [*gpu, "--concurrency", "64", "256", "--new-tokens", "64", "--repeats", "2"]
    return {"engine": engine, "http": http, "async_scheduling": overlap}


def run_benchmarks(dry_run: bool, out_dir: Path) -> dict[str, object]:
    """Each benchmark in a subprocess: its return code, time and output tail."""
    runs: dict[str, object] = {}
    for name, cmd in benchmark_commands(dry_run, out_dir).items():
        started = time.monotonic()
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        print(result.stdout[-3000:], result.stderr[-2000:], sep="\n", flush=True)
        runs[name] = {
            "command": " ".join(cmd[1:]),
            "returncode": result.returncode,
            "seconds": round(time.monotonic() - started, 1),
            "tail": result.stdout.splitlines()[-12:],
        }
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (forced "
                        "without CUDA)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-tests", action="store_true", help="no tests/gpu run")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds per case")
    parser.add_argument(
        "--skip-benchmarks", action="store_true", help="no engine / HTTP benchmark run"
    )
    args = parser.parse_args()
    dry_run = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp()) / "gpu_check.json" if dry_run else DEFAULT_OUT
    rounds, per_round = (1, 1) if dry_run else (args.repeat, 20)

    report: dict[str, object] = {
        "dry_run": dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "block_size": BLOCK_SIZE,
        "model_shape": DRY_SHAPE if dry_run else GPU_SHAPE,
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError as exc:
        report["triton"] = f"unavailable: {exc}"
    failed = False
    if not dry_run and not args.skip_tests:
        report["tests_gpu"] = tests = run_gpu_tests()
        failed |= tests["returncode"] != 0

    shape = DRY_SHAPE if dry_run else GPU_SHAPE
    config = GPT2Config(**shape, bos_token_id=1, eos_token_id=1)
    figures: list[Figures] = []
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(config).eval().to(device=device, dtype=dtype)
        model = PagedGPT2.from_hf(hf)
        if model.decode_kernel() != "triton" and not dry_run:
            raise SystemExit(f"the Triton kernel is not used on {device}: see the log")
        for case in cases(dry_run):
            f = bench_case(model, case, rounds, per_round)
            figures.append(f)
            name = f.dtype
            print(
                f"{name:>9} {f.case:>13} bs {f.batch:>3} ctx {f.mean_context:>6}/{f.max_context:<5}"
                f" triton {f.triton_ms:8.3f} ms  gather {f.gather_ms:8.3f} ms"
                f" (x{f.gather_over_triton:.2f})  matmuls {f.matmuls_ms:8.3f} ms"
                f" (step x{f.triton_over_matmuls:.2f})  logit diff {f.max_logit_diff:.2e}",
                flush=True,
            )
            if not f.max_logit_diff <= LOGIT_TOLERANCE[name]:
                print(f"FAIL: logits differ by {f.max_logit_diff} > {LOGIT_TOLERANCE[name]}")
                failed = True
        del hf, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["decode_step"] = [asdict(f) for f in figures]
    if not args.skip_benchmarks:
        bench_dir = out.parent / "benchmarks" if dry_run else ROOT / "docs" / "benchmarks" / "gpu"
        report["benchmarks"] = runs = run_benchmarks(dry_run, bench_dir)
        failed |= any(run["returncode"] != 0 for run in runs.values())  # type: ignore[index]
    report["passed"] = not failed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"figures written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
