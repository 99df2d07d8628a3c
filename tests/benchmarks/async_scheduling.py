"""Async scheduling on and off, side by side (a script, never a test):
`python -m tests.benchmarks.async_scheduling [--model PATH] [--device cuda --dtype bfloat16]
[--concurrency 16 64] [--out DIR]`.

For each concurrency: the same greedy requests (fixed output length), run by the engine with
`async_scheduling="off"` and `"on"`, alternating, `--repeats` times each; prints tokens/s of
each run, the median ratio on/off, and whether the outputs were identical (`--out`: also as
async_scheduling_<device>.json there; `make gpu-check` runs it on the GPU). Numbers are
ratios measured side by side in one process: machines (this one is shared) are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from app.engine.async_scheduling import AsyncScheduling
from app.modeling.loader import load_model
from tests.benchmarks.engine import bench_engine, make_prompts


def run(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    new_tokens: int,
    mode: AsyncScheduling,
) -> tuple[float, dict[str, list[int]]]:
    """tokens/s and each request's output of one run (the engine benchmark's run)."""
    tokens: dict[str, list[int]] = {}
    figures = bench_engine(
        model, tokenizer, prompts, new_tokens, token_ids=tokens, async_scheduling=mode
    )
    assert (figures["overlapped_steps"] > 0) == (mode == "on")
    return figures["tok_s"], tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/kogpt2-base-random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16")
    parser.add_argument("--out", default=None, help="a folder for the JSON figures")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 48])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    vocab = int(model.config.vocab_size)
    print(f"device {model.device}, {model.dtype}, torch threads {torch.get_num_threads()}")
    rows: list[dict[str, Any]] = []
    run(model, tokenizer, make_prompts(4, 8, 8, vocab, 1), 4, "on")  # warm-up
    for n in args.concurrency:
        prompts = make_prompts(n, *args.prompt_len, vocab, seed=n)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        outputs: dict[str, dict[str, list[int]]] = {}
        for r in range(args.repeats):
            order: tuple[AsyncScheduling, ...] = ("off", "on") if r % 2 == 0 else ("on", "off")
            for mode in order:
                rate, outputs[mode] = run(model, tokenizer, prompts, args.new_tokens, mode)
                rates[mode].append(rate)
        ratios = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
        same = outputs["on"] == outputs["off"]
        print(
            f"{n:4d} requests x {args.new_tokens} tokens: "
            f"off {' '.join(f'{x:7.1f}' for x in rates['off'])} tok/s | "
            f"on {' '.join(f'{x:7.1f}' for x in rates['on'])} tok/s | "
            f"on/off median {statistics.median(ratios):.3f} | identical outputs: {same}"
        )
        rows.append(
            {
                "concurrency": n,
                "new_tokens": args.new_tokens,
                "off_tok_s": rates["off"],
                "on_tok_s": rates["on"],
                "on_off_median": statistics.median(ratios),
                "identical_outputs": same,
            }
        )
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"async_scheduling_{model.device.type}.json"
        figures = {"model": args.model, "dtype": str(model.dtype).removeprefix("torch.")}
        path.write_text(json.dumps({**figures, "runs": rows}, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
