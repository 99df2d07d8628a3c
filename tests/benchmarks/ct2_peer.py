"""CTranslate2 as a peer in the engine benchmark (tests/benchmarks/engine.py).

The checkpoint is converted once per quantization with CTranslate2's TransformersConverter and
cached next to it (`models/<name>-ct2-float32/`, `models/<name>-ct2-int8/`, git-ignored).
`generate_batch` runs on the same token lists as the other systems: greedy, the whole
concurrency level in one call (max_batch_size = concurrency), exactly `new_tokens` new tokens
(eos cannot end a sequence early: min_length = max_length = new_tokens), with the torch thread
count as intra_threads.

Stand-alone smoke check (conversion, token counts, greedy agreement with transformers):
    python -m tests.benchmarks.ct2_peer [--model DIR] [--prompts 4] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import ctranslate2
import torch
from ctranslate2.converters import TransformersConverter

ROOT = Path(__file__).resolve().parents[2]
QUANTIZATIONS = ("float32", "int8")


class _PaddedVocabTokenizer:
    """The checkpoint's tokenizer with its vocabulary padded to the model's vocab_size.

    The benchmark checkpoints share the embedded model's 3262-token tokenizer but have a
    51200-row embedding; CTranslate2 wants one vocabulary entry per row, so the missing ids
    get placeholder names (the benchmark feeds token ids, never text)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._tokenizer.get_vocab())
        taken = set(vocab.values())
        for i in range(self._vocab_size):
            if i not in taken:
                vocab[placeholder(i)] = i
        return vocab

    def __getattr__(self, name: str) -> Any:  # bos_token, eos_token, unk_token, ...
        return getattr(self._tokenizer, name)


def placeholder(token_id: int) -> str:
    return f"<ct2_unused_{token_id}>"


class _PaddingConverter(TransformersConverter):
    def load_tokenizer(self, tokenizer_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
        tokenizer = super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
        config = _read_config(Path(model_name_or_path))
        return _PaddedVocabTokenizer(tokenizer, int(config["vocab_size"]))


def _read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def converted_dir(model_dir: Path, quantization: str) -> Path:
    return model_dir.parent / f"{model_dir.name}-ct2-{quantization}"


def convert(model_dir: Path, quantization: str) -> Path:
    """The CTranslate2 model for `model_dir` in `quantization`, converted on first use."""
    out = converted_dir(model_dir, quantization)
    if (out / "model.bin").is_file() and (out / "model.bin").stat().st_mtime >= (
        model_dir / "config.json"
    ).stat().st_mtime:
        return out
    started = time.perf_counter()
    _PaddingConverter(str(model_dir)).convert(str(out), quantization=quantization, force=True)
    print(f"converted {model_dir.name} to {out} in {time.perf_counter() - started:.1f} s")
    return out


def load_generator(
    model_dir: Path, quantization: str, threads: int
) -> tuple[ctranslate2.Generator, list[str]]:
    """The generator (intra_threads = `threads`, as torch gets) and its vocabulary."""
    ct2_dir = convert(model_dir, quantization)
    generator = ctranslate2.Generator(
        str(ct2_dir),
        device="cpu",
        compute_type=quantization,
        inter_threads=1,
        intra_threads=threads,
    )
    return generator, vocabulary(ct2_dir)


def vocabulary(ct2_dir: Path) -> list[str]:
    """Token strings by id, as the converted model's vocabulary file has them."""
    if (ct2_dir / "vocabulary.json").is_file():
        return list(json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8")))
    return (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")


def generate(
    generator: ctranslate2.Generator,
    vocab: list[str],
    prompts: list[list[int]],
    new_tokens: int,
) -> tuple[list[list[int]], float]:
    """Greedy continuations of `prompts` (exactly `new_tokens` each) and the seconds taken."""
    start_tokens = [[vocab[t] for t in prompt] for prompt in prompts]
    start = time.perf_counter()
    results = generator.generate_batch(
        start_tokens,
        max_batch_size=len(prompts),
        beam_size=1,
        sampling_topk=1,
        max_length=new_tokens,
        min_length=new_tokens,  # eos is masked until then, as min_new_tokens does
        include_prompt_in_result=False,
    )
    elapsed = time.perf_counter() - start
    outputs = [list(r.sequences_ids[0]) for r in results]
    lengths = {len(o) for o in outputs}
    if lengths != {new_tokens}:
        raise RuntimeError(f"CTranslate2 generated {sorted(lengths)} tokens, not {new_tokens}")
    return outputs, elapsed


def bench_ct2(
    generator: ctranslate2.Generator, vocab: list[str], prompts: list[list[int]], new_tokens: int
) -> tuple[dict[str, float], list[list[int]]]:
    generate(generator, vocab, prompts[:2], 4)  # warm-up (allocator, first-call costs)
    outputs, seconds = generate(generator, vocab, prompts, new_tokens)
    tokens = sum(map(len, outputs))
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}, outputs


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """How far two systems' greedy outputs agree: identical sequences, and per sequence the
    position of the first differing token (after it the continuations diverge anyway)."""
    first_diff: list[int | None] = []
    for a, b in zip(reference, other, strict=True):
        pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if pos is None and len(a) != len(b):
            pos = min(len(a), len(b))
        first_diff.append(pos)
    same = sum(d is None for d in first_diff)
    return {
        "sequences": len(reference),
        "identical": same,
        "identical_rate": same / len(reference) if reference else 1.0,
        "first_difference_at": first_diff,
    }


@torch.inference_mode()
def _hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    cfg = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=3
    )
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        outs.append(out[0, len(prompt) :].tolist())
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "kogpt2-base-random"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    vocab_size = int(_read_config(model_dir)["vocab_size"])
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(7, vocab_size, (n,), generator=gen).tolist()
        for n in torch.randint(8, 33, (args.prompts,), generator=gen).tolist()
    ]
    reference = _hf_greedy(model_dir, prompts, args.new_tokens)
    for quantization in QUANTIZATIONS:
        generator, vocab = load_generator(model_dir, quantization, args.threads)
        stats, outputs = bench_ct2(generator, vocab, prompts, args.new_tokens)
        agree = agreement(reference, outputs)
        print(
            f"ctranslate2 {quantization}: {stats['tok_s']:.1f} tok/s; vs transformers greedy: "
            f"{agree['identical']}/{agree['sequences']} identical, first differences at "
            f"{agree['first_difference_at']}"
        )


if __name__ == "__main__":
    main()
