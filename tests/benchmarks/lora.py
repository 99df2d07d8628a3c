"""Fine-tunes served together (a script, never a test):
`python -m tests.benchmarks.lora [--model DIR] [--requests 64] [--new-tokens 32]`.

64 concurrent greedy requests run in one engine to the end, all on the base model, then spread
evenly over 1, 4 and 16 LoRA adapters (random peft adapters, rank --rank, on c_attn, c_proj
and c_fc: every Conv1D of every layer), then half on the base model and half on a second
full model (the base's weights perturbed: a full fine-tune of the same shape, served from the
same engine: one forward per model per step over the shared KV tensors). Printed: wall time
of each run and its ratio to the base model's (goal for adapters: at most 1.2 at 16 on CPU),
measured side by side in one process
(rounds alternate the cases; the median and the fastest runs' ratios are printed: on a
shared machine a run that another process slows shows in the median only). Batch-invariant
mode (on by default for float32 on CPU) runs each adapter's matmuls row-invariant, one pair
per adapter; --batch-invariant off measures the stacked update (two matmuls per layer and
module for all adapters of a step, app/modeling/lora.py StepLoRA).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.loader import DEFAULT_MODEL_DIR, load_model
from app.options.params import SamplingParams
from tests.lora_helpers import make_adapter, make_finetune

Target = tuple[str | None, str | None]  # (full model, adapter); None: the default / none


def run(engine: LLMEngine, prompts: list[list[int]], targets: list[Target], new: int) -> float:
    for i, (prompt, (model, lora)) in enumerate(zip(prompts, targets, strict=True)):
        params = SamplingParams(
            max_new_tokens=new, ignore_eos=True, model_name=model, lora_name=lora
        )
        engine.add_request(f"r{i}", prompt, params)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint dir")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-invariant", default="auto", choices=["auto", "on", "off"])
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        second_dir = make_finetune(Path(tmp) / "tuned", 1, base=args.model)
        second = load_model(str(second_dir), device="cpu", dtype="float32")
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            num_blocks=2048,
            max_num_seqs=args.requests,
            enable_prefix_caching=False,
            max_loras=16,
            batch_invariant=args.batch_invariant,  # type: ignore[arg-type]
        ),
        more_models={"tuned": second.model},
    )
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(16):
            targets = ["c_attn", "c_proj", "c_fc"]
            path = make_adapter(Path(tmp) / f"a{i}", i, args.rank, 16, targets, args.model)
            engine.lora.load(f"a{i}", path)
    vocab = int(loaded.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(5, vocab, (args.prompt_tokens,), generator=gen).tolist()
        for _ in range(args.requests)
    ]
    cases: dict[str, list[Target]] = {"base": [(None, None)] * args.requests}
    for k in (1, 4, 16):
        cases[f"{k} adapters"] = [(None, f"a{i % k}") for i in range(args.requests)]
    cases["2 full models"] = [(None if i % 2 else "tuned", None) for i in range(args.requests)]
    run(engine, prompts, cases["16 adapters"], 2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, names in cases.items():
            times[name].append(run(engine, prompts, names, args.new_tokens))
    invariant = engine.runner.model.is_batch_invariant()
    print(
        f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.new_tokens} new) tokens,"
        f" rank {args.rank}, torch threads {torch.get_num_threads()}, batch-invariant {invariant}"
    )
    base = statistics.median(times["base"])
    for name, samples in times.items():
        median = statistics.median(samples)
        each = " ".join(f"{t:.3f}" for t in samples)
        fastest = min(samples) / min(times["base"])
        print(
            f"{name:>12}: {median:7.3f} s  x{median / base:.2f} of base "
            f"(fastest runs: x{fastest:.2f}; runs: {each})"
        )


if __name__ == "__main__":
    main()
