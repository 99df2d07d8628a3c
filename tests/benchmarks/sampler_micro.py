"""Sampler micro-benchmark (a script, never a test): `python -m tests.benchmarks.sampler_micro`.

One engine step's sampling at the engine benchmark's shape: S rows of the vocabulary (64 x
51200 by default), every other row with the benchmark's options (seeded sampling,
temperature 0.8, top-k 40, top-p 0.9; `--options` / `--unseeded` for others), the rest
greedy. Best-of-N wall times, side by side in one run:
- the whole batched call through `group_sampling.sample_groups` (what the engine runs: row
  building, the logits gather, `Sampler.sample`), all greedy and half optioned; their
  difference is what the options cost per step;
- `Sampler.sample` alone on the same two batches;
- the stages of the full-row option path as plain torch ops (float32 copy, log-softmax,
  temperature, top-k, top-p's sort, softmax, argmax, the exponential fills of the seeded rows)
  and the fills alone in the draw's thread pool: the floor no exact path can go under (torch's
  serial RNG fills V values per seeded row and step, exactly as `multinomial` does).
Only public entry points are timed as wholes, so the same script measures an older tree:
`PYTHONPATH=/path/to/old/tree python tests/benchmarks/sampler_micro.py`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from app.engine.core.request import Request, Sequence
from app.engine.sample.group_sampling import sample_groups
from app.engine.sample.row import SamplingRow
from app.engine.sample.sampler import Sampler
from app.options.params import SamplingParams

OPTIONS: dict[str, Any] = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9}


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: thread pools, allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def best_interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-N of each call, the calls taking turns: a busy spell hits them alike."""
    best = dict.fromkeys(calls, float("inf"))
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1e3 for name, seconds in best.items()}


def make_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Peaked like a language model's logits: a few dozen clear candidates over a broad floor."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 2.0
    top = torch.randint(0, vocab, (rows, 64), generator=gen)
    logits.scatter_add_(1, top, torch.rand(rows, 64, generator=gen) * 8.0)
    return logits


def make_states(
    rows: int, options: dict[str, Any] | None, prompt_len: int, seeded: bool = True
) -> list[tuple[Any, dict[int, int]]]:
    """`sample_groups`' input: one single-sequence request per logits row, every other one
    with `options` (and a seed of its own when `seeded`)."""
    plain = []
    for i in range(rows):
        with_options = options is not None and i % 2 == 1
        extra = {**(options or {}), **({"seed": i} if seeded else {})} if with_options else {}
        params = SamplingParams(max_new_tokens=64, ignore_eos=True, **extra)
        seq = Sequence.from_prompt(list(range(100 + i, 100 + i + prompt_len)))
        gen = torch.Generator().manual_seed(i) if with_options and seeded else None
        state = SimpleNamespace(
            request=Request(f"r{i}", [seq], max_total_tokens=prompt_len + 64, params=params),
            params=params,
            generator=gen,
        )
        plain.append((state, {seq.seq_id: i}))
    return plain


def rows_of(plain: list[tuple[Any, dict[int, int]]]) -> list[SamplingRow]:
    return [
        SamplingRow.from_params(state.params, state.request.seqs[0].token_ids, 30, state.generator)
        for state, _rows in plain
    ]


def stage_times(logits: torch.Tensor, repeats: int) -> dict[str, float]:
    """The full-row option path's stages as plain torch ops, on the optioned half."""
    from app.engine.sample.seeded_draw import _executor

    half = logits[1::2].contiguous()
    n = half.shape[0]
    scaled = half / 0.8
    kth = torch.topk(scaled, 40, dim=-1).values[:, -1:]
    top_k = scaled.masked_fill(scaled < kth, float("-inf"))
    noise = torch.empty_like(half)
    gens = [torch.Generator().manual_seed(j) for j in range(n)]

    def fill(j: int) -> None:
        noise[j].exponential_(1.0, generator=gens[j])

    def fills_serial() -> None:
        for j in range(n):
            fill(j)

    def fills_pool() -> None:
        for task in [_executor().submit(fill, j) for j in range(n)]:
            task.result()

    probs = torch.softmax(top_k, dim=-1)
    return {
        "float32 copy, all rows": best_ms(lambda: logits.to(torch.float32, copy=True), repeats),
        "log_softmax, all rows": best_ms(lambda: torch.log_softmax(logits, -1), repeats),
        "argmax, all rows": best_ms(lambda: torch.argmax(logits, -1), repeats),
        "gather of the optioned rows": best_ms(
            lambda: logits.index_select(0, torch.arange(1, logits.shape[0], 2)), repeats
        ),
        "temperature (optioned rows)": best_ms(lambda: half / 0.8, repeats),
        "top-k 40: topk + masked_fill": best_ms(
            lambda: scaled.masked_fill(
                scaled < torch.topk(scaled, 40, dim=-1).values[:, -1:], float("-inf")
            ),
            repeats,
        ),
        "top-p: full-row sort (HF's way)": best_ms(lambda: torch.sort(top_k, -1), repeats),
        "softmax (optioned rows)": best_ms(lambda: torch.softmax(top_k, -1), repeats),
        "log_softmax (optioned rows)": best_ms(lambda: torch.log_softmax(top_k, -1), repeats),
        "divide + argmax (the Gumbel draw)": best_ms(
            lambda: torch.argmax(probs / noise, -1), repeats
        ),
        f"exponential fills, {n} rows, serial": best_ms(fills_serial, repeats),
        f"exponential fills, {n} rows, thread pool (floor)": best_ms(fills_pool, repeats),
        f"topk {41} of the optioned rows": best_ms(lambda: torch.topk(half, 41, -1), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=51200)
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--options", default=json.dumps(OPTIONS), help="JSON options of the optioned half"
    )
    parser.add_argument("--unseeded", action="store_true", help="optioned rows without seeds")
    parser.add_argument("--json", default="", help="also write the timings here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logits = make_logits(args.rows, args.vocab, seed=0)
    sampler = Sampler(torch.Generator().manual_seed(0))
    calls: dict[str, Callable[[], object]] = {}
    options = json.loads(args.options)
    for label, optioned in (("all greedy", None), ("half with options", options)):
        plain = make_states(args.rows, optioned, args.prompt_len, not args.unseeded)
        rows = rows_of(plain)
        calls[f"sample_groups, {label}"] = lambda p=plain: sample_groups(sampler, logits, p, {})
        calls[f"Sampler.sample, {label}"] = lambda r=rows: sampler.sample(logits, r)
    results = best_interleaved(calls, args.repeats)
    results["options cost per step (sample_groups)"] = (
        results["sample_groups, half with options"] - results["sample_groups, all greedy"]
    )
    stages = stage_times(logits, args.repeats)
    width = max(map(len, [*results, *stages]))
    print(
        f"{args.rows} rows x {args.vocab}, {torch.get_num_threads()} threads, best of "
        f"{args.repeats} (ms)"
    )
    for name, ms in results.items():
        print(f"  {name:{width}s} {ms:8.2f}")
    print("stages of the full-row option path (plain torch ops):")
    for name, ms in stages.items():
        print(f"  {name:{width}s} {ms:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"wholes": results, "stages": stages}, indent=2))


if __name__ == "__main__":
    main()
