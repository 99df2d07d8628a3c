"""Prompt log-probs and the prefix cache (a script, never a test):
`python -m tests.benchmarks.prompt_logprobs [--model models/kogpt2-base-random]`.

A cached prefix has KV but no logits, so a request asking for prompt log-probs must run the
model over the prefix again. Two ways: bypass the lookup (what the scheduler does: compute
the prompt into fresh blocks, which are then cached too), or recompute over the adopted
cached blocks. Recompute runs the same forward over the same positions and, since it writes
K/V into blocks other sequences share, copy-on-write copies every adopted block first: its
cost is bypass + those copies. Measured side by side on one engine, time to first token:
  hit      the prefix found in the cache, no prompt log-probs (the tail only);
  full     the whole prompt computed, no prompt log-probs (the forward bypass must run);
  bypass   the whole prompt computed with prompt log-probs (LM head over every position);
  copies   copying the prefix's blocks once (what recompute adds to bypass).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.loader import load_model
from app.options.params import SamplingParams


def ttft(
    engine: LLMEngine, request_id: str, prompt: list[int], prompt_logprobs: int | None
) -> float:
    params = SamplingParams(max_new_tokens=1, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    engine.add_request(request_id, prompt, params)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: embedded)")
    parser.add_argument("--prefix", type=int, default=480, help="cached prefix tokens")
    parser.add_argument("--tail", type=int, default=32, help="tokens after the prefix")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    vocab = int(loaded.config.vocab_size)
    block_size = 16
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(num_blocks=512, block_size=block_size, max_num_batched_tokens=2048),
    )
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, vocab, (args.prefix,), generator=gen).tolist()
    ttft(engine, "warm", [*prefix, 7], None)  # caches the prefix's blocks
    times: dict[str, list[float]] = {"hit": [], "full": [], "bypass": [], "copies": []}
    for r in range(args.repeats):
        tail = torch.randint(5, vocab, (args.tail,), generator=gen).tolist()
        times["hit"].append(ttft(engine, f"hit{r}", prefix + tail, None))
        times["bypass"].append(ttft(engine, f"bypass{r}", prefix + tail, 1))
        fresh = torch.randint(5, vocab, (args.prefix + args.tail,), generator=gen).tolist()
        times["full"].append(ttft(engine, f"full{r}", fresh, None))
        pairs = [(i, args.prefix // block_size + 40 + i) for i in range(args.prefix // block_size)]
        start = time.perf_counter()
        engine.runner.kv_cache.copy_blocks(pairs)
        times["copies"].append(time.perf_counter() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"prompt {args.prefix} + {args.tail} tokens, vocab {vocab}, median of {args.repeats}")
    for name, value in med.items():
        print(f"  {name:7s} {value * 1000:8.1f} ms  ({value / med['full']:.2f} x full)")
    print(f"  recompute = bypass + copies ~ {(med['bypass'] + med['copies']) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
