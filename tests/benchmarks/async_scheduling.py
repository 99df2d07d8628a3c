"""Async scheduling on and off, side by side (a script, never a test):
`python -m tests.benchmarks.async_scheduling [--model PATH] [--concurrency 16 64]`.

For each concurrency: the same greedy requests (fixed output length), run by the engine with
`async_scheduling="off"` and `"on"`, alternating, `--repeats` times each; prints tokens/s of
each run, the median ratio on/off, and whether the outputs were identical. Numbers are ratios
measured side by side in one process: machines (this one is shared) are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.loader import load_model
from app.options.params import SamplingParams
from tests.benchmarks.engine import make_prompts


def run(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    new_tokens: int,
    mode: str,
) -> tuple[float, dict[str, list[int]]]:
    block_size = 16
    per_seq = -(-(max(map(len, prompts)) + new_tokens) // block_size)
    engine = LLMEngine(
        model,
        tokenizer,
        EngineConfig(
            num_blocks=per_seq * len(prompts) + 8,
            block_size=block_size,
            max_num_seqs=max(256, len(prompts)),
            max_num_batched_tokens=2048,
            async_scheduling=mode,  # type: ignore[arg-type]
        ),
    )
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=False)
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {}
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            for seq in out.outputs:
                generated += len(seq.token_ids)
                tokens.setdefault(out.request_id, []).extend(seq.token_ids)
    elapsed = time.perf_counter() - start
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert (engine.num_overlapped_steps > 0) == (mode == "on")
    return generated / elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/kogpt2-base-random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 48])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    vocab = int(model.config.vocab_size)
    print(f"device {model.device}, torch threads {torch.get_num_threads()}")
    run(model, tokenizer, make_prompts(4, 8, 8, vocab, 1), 4, "on")  # warm-up
    for n in args.concurrency:
        prompts = make_prompts(n, *args.prompt_len, vocab, seed=n)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        outputs: dict[str, dict[str, list[int]]] = {}
        for r in range(args.repeats):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
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


if __name__ == "__main__":
    main()
