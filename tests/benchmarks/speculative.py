"""Speculative decoding speed (a script, never a test): `python -m tests.benchmarks.speculative`.

Generated tokens per second of the engine with and without prompt lookup
(prompt_lookup_num_tokens), in the same run, on two prompt sets for the embedded model:
"copying" prompts (a text followed by its own beginning, so the continuation repeats text
that is in the prompt, as when summarizing or editing a document) and "normal" prompts
(short openings, little to look up). Greedy decoding; the outputs with and without
speculation are asserted equal. Runs alternate between the modes and the median is kept,
since the machine is shared and noisy. Draft-model speculation (num_assistant_tokens) is
measured too, with --draft-model or else the model's first --draft-layers layers as the draft.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.loader import DEFAULT_MODEL_DIR, LoadedModel, load_model
from app.options.params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
STARTS = ["제10조 모든 국민은", "제1조 ① 대한민국은", "국회는 국민의", "대통령은 법률이 정하는"]


def make_engine(loaded: LoadedModel, draft: torch.nn.Module | None = None) -> LLMEngine:
    config = EngineConfig(num_blocks=512, block_size=16, max_num_batched_tokens=1024)
    return LLMEngine(loaded.model, loaded.tokenizer, config, draft_model=draft)


def truncated(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """The model's first `layers` blocks with its embeddings, ln_f and LM head."""
    draft = copy.deepcopy(model)
    draft.transformer.h = draft.transformer.h[:layers]
    draft.config.n_layer = layers
    return draft


def generate(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[list[int]], float, int]:
    """All prompts as one batch: outputs, seconds, engine steps."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b{engine.num_steps}-{i}", prompt, params)
    outputs: dict[str, list[int]] = {}
    steps = engine.num_steps
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            for seq in out.outputs:
                outputs.setdefault(out.request_id, []).extend(seq.token_ids)
    seconds = time.perf_counter() - start
    return [outputs[k] for k in sorted(outputs)], seconds, engine.num_steps - steps


def copying_prompts(loaded: LoadedModel, new_tokens: int) -> list[list[int]]:
    """Each start, the model's greedy continuation of it, then the start again."""
    engine = make_engine(loaded)
    encode = lambda s: loaded.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    starts = [encode(s) for s in STARTS]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    texts, _, _ = generate(engine, starts, params)
    return [s + t + encode("\n") + s for s, t in zip(starts, texts, strict=True)]


def measure(
    engines: dict[str, LLMEngine],
    modes: dict[str, dict[str, Any]],
    prompts: list[list[int]],
    new_tokens: int,
    repeats: int,
) -> dict[str, dict[str, float]]:
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    steps: dict[str, int] = {}
    reference = None
    for _ in range(repeats):
        for mode, extra in modes.items():
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **extra)
            outs, secs, n = generate(engines[mode], prompts, params)
            if reference is None:
                reference = outs
            assert outs == reference, f"{mode}: output differs from plain decoding"
            seconds[mode].append(secs)
            steps[mode] = n
    tokens = new_tokens * len(prompts)
    return {
        m: {"tokens_per_s": tokens / statistics.median(s), "steps": steps[m]}
        for m, s in seconds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--draft-model", default=None)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--lookup-tokens", type=int, default=8)
    parser.add_argument("--assistant-tokens", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype="float32")
    if args.draft_model:
        draft = load_model(args.draft_model, device=args.device, dtype="float32").model
    else:
        draft = truncated(loaded.model, args.draft_layers)
    modes: dict[str, dict[str, Any]] = {
        "plain": {},
        "prompt_lookup": {"prompt_lookup_num_tokens": args.lookup_tokens},
    }
    engines = {m: make_engine(loaded) for m in modes}
    modes["draft_model"] = {"num_assistant_tokens": args.assistant_tokens}
    engines["draft_model"] = make_engine(loaded, draft)
    encode = lambda s: loaded.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sets = {
        "copying": copying_prompts(loaded, args.new_tokens),
        "normal": [encode(s) for s in STARTS],
    }
    draft_name = args.draft_model or f"its first {args.draft_layers} layers"
    print(
        f"model {args.model}, draft {draft_name}, {args.new_tokens} new tokens, greedy, "
        f"{args.threads} thread(s)"
    )
    for name, prompts in sets.items():
        for batch in (prompts[:1], prompts):
            result = measure(engines, modes, batch, args.new_tokens, args.repeats)
            base = result["plain"]["tokens_per_s"]
            for mode, r in result.items():
                print(
                    f"{name:8s} batch {len(batch)}  {mode:14s} {r['tokens_per_s']:8.1f} tok/s"
                    f"  {r['steps']:4d} steps  {r['tokens_per_s'] / base:5.2f}x"
                )


if __name__ == "__main__":
    main()
