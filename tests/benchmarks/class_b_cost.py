"""What each class-B decoding method costs (a script, never a test):

    python -m tests.benchmarks.class_b_cost [--model PATH] [--new-tokens 32] [--repeats 3]

On one prompt, in one run: transformers' own `model.generate` greedy and beam search (the
baselines), then contrastive search, DoLa, group beam search and constrained beam search as
the server runs them (app/engine/lanes/class_b, on the same GPT2LMHeadModel and DynamicCache, no
HTTP). Prints generated tokens per second (best of --repeats) and the ratio to greedy and,
for the beam methods, to beam search with as many beams. Results: docs/benchmarks/class_b.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.engine.lanes.class_b.runner import run_method
from app.modeling.loader import load_model
from app.options.class_b import CLASS_B_OPTIONS, ClassBParams, resolve_class_b
from app.options.resolve import resolve_sampling_params

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고"
BEAMS = 4
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("contrastive top_k=4", {"penalty_alpha": 0.6, "top_k": 4}),
    ("contrastive top_k=10", {"penalty_alpha": 0.6, "top_k": 10}),
    ('DoLa "high"', {"dola_layers": "high", "repetition_penalty": 1.2}),
    ("DoLa all layers", {"dola_layers": "all"}),
    ("group beam 4 beams / 2 groups", {"num_beams": BEAMS, "num_beam_groups": 2,
                                       "diversity_penalty": 1.0}),
    ("constrained beam 4 beams, 2 words", {"num_beams": BEAMS, "force_words": [" 법률", " 자유"]}),
]  # fmt: skip


def best_time(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """(seconds of the fastest run, tokens it generated)."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        runs.append((time.perf_counter() - start, tokens))
    return min(runs)


def class_b(loaded: Any, prompt: list[int], options: dict[str, Any]) -> ClassBParams:
    config = loaded.model.config
    options = dict(options)
    if options.get("dola_layers") == "all":
        options["dola_layers"] = list(range(config.n_layer))
    b = {k: options.pop(k) for k in list(options) if k in CLASS_B_OPTIONS}
    params = resolve_sampling_params(
        options, loaded.model.generation_config.to_dict(), config.n_positions, len(prompt),
        vocab_size=config.vocab_size,
    )  # fmt: skip
    encode = lambda text: loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    resolved = resolve_class_b(
        b, params, num_layers=config.n_layer, vocab_size=config.vocab_size, encode=encode
    )
    assert isinstance(resolved, ClassBParams)
    return resolved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(ROOT / "models" / "kogpt2-mini"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    model, n = loaded.model, args.new_tokens
    prompt = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt])

    def hf(**options: Any) -> Callable[[], int]:
        def go() -> int:
            with torch.inference_mode():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, **options
                )
            return int(out.shape[-1] - len(prompt))

        return go

    def ours(options: dict[str, Any]) -> Callable[[], int]:
        params = class_b(loaded, prompt, {**options, "max_new_tokens": n})
        return lambda: len(run_method(model, prompt, params, loaded.tokenizer)[0][0])

    rows: list[tuple[str, float, float | None]] = []
    seconds, tokens = best_time(hf(do_sample=False), args.repeats)
    greedy = tokens / seconds
    seconds, tokens = best_time(hf(num_beams=BEAMS, do_sample=False), args.repeats)
    beam = tokens / seconds
    rows += [("greedy (transformers generate)", greedy, None)]
    rows += [(f"beam search {BEAMS} beams (transformers generate)", beam, 1.0)]
    for name, options in METHODS:
        seconds, tokens = best_time(ours(options), args.repeats)
        rate = tokens / seconds
        rows.append((name, rate, rate / beam if "beam" in name else None))
    config = model.config
    print(
        f"model {Path(args.model).name} ({config.n_layer} layers, {config.n_embd} wide, vocab "
        f"{config.vocab_size}), fp32, torch {torch.__version__}, {args.threads} thread(s); "
        f"prompt {len(prompt)} tokens, {n} new tokens, best of {args.repeats}"
    )
    print("| method | tokens/s | vs greedy | vs beam search (same beams) |")
    print("| --- | --- | --- | --- |")
    for name, rate, vs_beam in rows:
        beam_cell = "-" if vs_beam is None else f"{vs_beam:.2f}x"
        print(f"| {name} | {rate:.1f} | {rate / greedy:.2f}x | {beam_cell} |")


if __name__ == "__main__":
    main()
