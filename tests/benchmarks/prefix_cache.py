"""Few-shot prefix reuse (a script, never a test): `python -m tests.benchmarks.prefix_cache`.

Time to first token for requests that share a long few-shot prefix (task + examples) and
differ only in the query: the first request computes the whole prompt (cold), later ones
find the prefix's full KV blocks in the prefix cache (cached). Measured in one run on the
same engine, with prefix caching on and, as a control, off. Writes JSON to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.loader import load_model
from app.options.params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def ttft(engine: LLMEngine, request_id: str, prompt: list[int]) -> float:
    """Seconds from admission to the first generated token (the request then runs out)."""
    engine.add_request(request_id, prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    first = None
    while engine.has_unfinished():
        outs = engine.step()
        if first is None and any(o.outputs for o in outs):
            first = time.perf_counter() - start
    assert first is not None
    return first


def run(loaded: Any, prefix: list[int], queries: list[list[int]], caching: bool) -> list[float]:
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(num_blocks=256, max_num_batched_tokens=2048, enable_prefix_caching=caching),
    )
    return [ttft(engine, f"q{i}", prefix + q) for i, q in enumerate(queries)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(ROOT / "models" / "kogpt2-base-random"))
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    gen = torch.Generator().manual_seed(0)
    vocab = int(loaded.config.vocab_size)
    prefix = torch.randint(7, vocab, (args.prefix_tokens,), generator=gen).tolist()
    queries = [torch.randint(7, vocab, (12,), generator=gen).tolist() for _ in range(args.queries)]
    run(loaded, prefix[:64], queries[:1], caching=False)  # warm-up
    with_cache = run(loaded, prefix, queries, caching=True)
    without = run(loaded, prefix, queries, caching=False)
    cold, cached = with_cache[0], statistics.median(with_cache[1:])
    result = {
        "model": Path(args.model).name,
        "prefix_tokens": args.prefix_tokens,
        "query_tokens": 12,
        "ttft_cold_s": cold,
        "ttft_cached_median_s": cached,
        "cached_over_cold": cached / cold,
        "ttft_no_cache_median_s": statistics.median(without),
        "with_cache_all_s": with_cache,
        "without_cache_all_s": without,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    print(f"cached / cold time to first token: {cached / cold:.3f}x (target <= 0.2x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache_cpu.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
