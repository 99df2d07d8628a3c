"""Throughput cost of grammar-constrained output (a script, never a test):

    python -m tests.benchmarks.grammar_cost [--model models/kogpt2-mini] [--requests 16]

One engine, the same prompts, three batches run back to back (each request alone in the
engine's batch with the others of its batch): unconstrained sampling, a JSON schema with
Korean string fields, and a Korean-text regex that stays open (so every request generates
exactly --max-new-tokens tokens, as the unconstrained batch does with ignore_eos). Prints
generated tokens per second for each and the ratio to the unconstrained batch. A warm-up
batch of each kind runs first (the llguidance tokenizer is built once per engine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.loader import load_model
from app.options.resolve import resolve_sampling_params

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["대한민국은", "모든 국민은", "국회는", "대통령은", "법률이 정하는 바에 의하여", "헌법"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "이름": {"type": "string", "maxLength": 20},
        "나이": {"type": "integer", "minimum": 0, "maximum": 150},
        "주소": {"type": "string", "maxLength": 40},
        "직업": {"enum": ["학생", "교사", "공무원", "의사"]},
    },
    "required": ["이름", "나이", "주소", "직업"],
    "additionalProperties": False,
}
OPEN_REGEX = "[가-힣 ]{1,2000}"  # Korean text and spaces, never complete before the limit
KINDS: dict[str, dict[str, Any]] = {
    "unconstrained": {"ignore_eos": True},
    "json_schema": {"grammar": {"type": "json", "value": SCHEMA}},
    "regex_open": {"grammar": {"type": "regex", "value": OPEN_REGEX}, "ignore_eos": True},
}


def run_batch(
    engine: LLMEngine, prompts: list[list[int]], options: dict[str, Any], tag: str
) -> tuple[int, float]:
    """(generated tokens, seconds) for one batch of requests run to completion."""
    n_pos = engine.runner.config.n_positions
    vocab = int(engine.runner.config.vocab_size)
    defaults = engine.runner.hf_model.generation_config.to_dict()
    for i, prompt in enumerate(prompts):
        opts = {**options, "seed": i}
        params = resolve_sampling_params(opts, defaults, n_pos, len(prompt), vocab_size=vocab)
        engine.add_request(f"{tag}-{i}", prompt, params)
    tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(out.error)
            tokens += sum(len(s.token_ids) for s in out.outputs)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(ROOT / "models" / "kogpt2-mini"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(num_blocks=1024))
    encoded = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    prompts = [encoded[i % len(encoded)] for i in range(args.requests)]
    base = {"do_sample": True, "max_new_tokens": args.max_new_tokens}
    for kind, options in KINDS.items():  # warm-up: allocator, llguidance tokenizer
        run_batch(engine, prompts[:2], {**base, **options}, f"warm-{kind}")
    results: dict[str, dict[str, float]] = {}
    for repeat in range(args.repeats):  # interleaved, so drift on a shared machine is shared
        for kind, options in KINDS.items():
            tokens, seconds = run_batch(engine, prompts, {**base, **options}, f"{kind}-{repeat}")
            slot = results.setdefault(kind, {"tokens": 0, "seconds": 0.0})
            slot["tokens"] += tokens
            slot["seconds"] += seconds
    plain = results["unconstrained"]["tokens"] / results["unconstrained"]["seconds"]
    report = {
        "model": Path(args.model).name,
        "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
    }
    for kind, slot in results.items():
        rate = slot["tokens"] / slot["seconds"]
        report[kind] = {
            "tokens": slot["tokens"],
            "tokens_per_s": round(rate, 1),
            "ratio_to_unconstrained": round(rate / plain, 3),
        }
    print(json.dumps(report, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
