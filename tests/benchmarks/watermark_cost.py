"""What watermarking costs in the batched engine (a script, never a test).

`python -m tests.benchmarks.watermark_cost [--model PATH] [--concurrency 16] [--new-tokens 32]`

Same prompts, same run: the engine with plain seeded sampling on every request, then with
`watermarking_config` (transformers' WatermarkLogitsProcessor, one per watermarked row) on
half and on all of them. Prints tokens/s and the ratio to the plain run. Chat has no
per-token cost of its own (the template only builds the prompt), so it is not measured here.
"""

from __future__ import annotations

import argparse
import platform
from typing import Any

import torch

from app.modeling.loader import load_model
from tests.benchmarks.engine import ROOT, bench_engine, make_prompts

WATERMARK = {"bias": 2.0, "greenlist_ratio": 0.25}


def options(n: int, share: float) -> list[dict[str, Any]]:
    marked = int(n * share)
    return [
        {"do_sample": True, "seed": i, **({"watermarking_config": WATERMARK} if i < marked else {})}
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "kogpt2-base-random"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    vocab = int(loaded.model.config.vocab_size)
    prompts = make_prompts(args.concurrency, 16, 48, vocab, seed=7)
    bench_engine(loaded.model, loaded.tokenizer, prompts[:2], 4)  # warm-up
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    rates = {}
    for label, share in (("plain sampling", 0.0), ("half watermarked", 0.5), ("all", 1.0)):
        run = bench_engine(
            loaded.model, loaded.tokenizer, prompts, args.new_tokens, options(len(prompts), share)
        )
        rates[label] = run["tok_s"]
        ratio = run["tok_s"] / rates["plain sampling"]
        print(f"  {label:<18} {run['tok_s']:8.1f} tok/s  {ratio:.3f}x of plain")


if __name__ == "__main__":
    main()
