"""Quality of quantize=int8: perplexity of the embedded model, float32 vs int8 (a script).

    python -m tests.benchmarks.int8_quality [--bound 0.02] [--threads 1]

Text: the held-out split of models/kogpt2-mini's own training corpus, rebuilt with
models/build_embedded.py (``load_corpus`` + ``split_tokens``: the last 5% of every document,
771 tokens, never trained on), and, for comparison, the training split (text the model
predicts confidently, where quantization error shows more). Perplexity is computed as the
build computed it (windows of 128 tokens, stride 127, each token after the first predicted
once) through kogpt-serve's own paged forward (PagedGPT2 over a paged KV cache, logits of
every prompt token), once with quantize=none (float32, the mkldnn/aten backend) and once
with quantize=int8. transformers' forward in float32 is printed alongside as a check.

Pass: int8 perplexity within ``--bound`` (relative) of float32 on both splits. Also
printed: mean |log p int8 - log p float32| of the target tokens and the share of
positions where both pick the same top-1 token (what greedy decoding would emit).
Exit status 1 on fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.linear import Quantize
from app.modeling.loader import load_model

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "models" / "kogpt2-mini"
BLOCK_SIZE = 16


def build_script() -> ModuleType:
    """models/build_embedded.py as a module (it is a script, not a package)."""
    path = ROOT / "models" / "build_embedded.py"
    spec = importlib.util.spec_from_file_location("build_embedded", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def corpus_splits(model_dir: Path) -> dict[str, torch.Tensor]:
    """{"held-out": ids, "train": ids}, split exactly as the build split them."""
    build = build_script()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    train, held = build.split_tokens(tok, build.load_corpus(), build.TrainConfig().heldout_fraction)
    return {"held-out": held, "train": train}


def windows(ids: torch.Tensor, context: int) -> list[list[int]]:
    """The build's evaluation windows: each token after the first is a target exactly once."""
    out = []
    for start in range(0, len(ids) - 1, context - 1):
        chunk = ids[start : start + context].tolist()
        if len(chunk) > 1:
            out.append(chunk)
    return out


def paged_logprobs(
    model: torch.nn.Module, quantize: Quantize, wins: list[list[int]]
) -> tuple[torch.Tensor, PagedGPT2]:
    """Log-softmax of the paged forward's logits at every target of every window (float64),
    and the paged model (its backend is printed)."""
    paged = PagedGPT2.from_hf(model, "auto", quantize)
    per_window = -(-max(map(len, wins)) // BLOCK_SIZE)
    kv = KVCache.allocate(model.config, per_window * len(wins), BLOCK_SIZE, paged.dtype)
    chunks = [
        SeqChunk(w, 0, list(range(i * per_window, (i + 1) * per_window)), all_logits=True)
        for i, w in enumerate(wins)
    ]
    step = build_step_input(chunks, BLOCK_SIZE, "cpu")
    rows = paged(step, kv).split(step.logits_counts)
    # A window's last logits row predicts past its end: not a target.
    return torch.cat([F.log_softmax(r[:-1].double(), dim=-1) for r in rows]), paged


@torch.inference_mode()
def hf_logprobs(model: torch.nn.Module, wins: list[list[int]]) -> torch.Tensor:
    rows = [model(torch.tensor([w])).logits[0, :-1] for w in wins]
    return torch.cat([F.log_softmax(r.double(), dim=-1) for r in rows])


def targets(wins: list[list[int]]) -> torch.Tensor:
    return torch.tensor([t for w in wins for t in w[1:]])


def perplexity(logprobs: torch.Tensor, tgt: torch.Tensor) -> float:
    return math.exp(-logprobs.gather(1, tgt[:, None]).mean().item())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(MINI))
    parser.add_argument("--bound", type=float, default=0.02, help="relative perplexity bound")
    parser.add_argument("--context", type=int, default=128, help="window, as the build's")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    model = load_model(str(model_dir), device="cpu", dtype="float32").model
    passed = True
    print(f"{model_dir.name}: perplexity, float32 vs int8 (bound {args.bound:.1%} relative)")
    for split, ids in corpus_splits(model_dir).items():
        wins = windows(ids, args.context)
        tgt = targets(wins)
        hf = hf_logprobs(model, wins)
        fp32, fp32_model = paged_logprobs(model, "none", wins)
        int8, int8_model = paged_logprobs(model, "int8", wins)
        ppl = {name: perplexity(lp, tgt) for name, lp in (("hf", hf), ("fp", fp32), ("q", int8))}
        rel = ppl["q"] / ppl["fp"] - 1
        ok = abs(rel) <= args.bound
        passed &= ok
        lp_fp, lp_q = fp32.gather(1, tgt[:, None]), int8.gather(1, tgt[:, None])
        same_top1 = (fp32.argmax(-1) == int8.argmax(-1)).double().mean().item()
        print(
            f"  {split:8s} {len(tgt):6d} tokens | transformers fp32 {ppl['hf']:10.3f} | "
            f"ours {fp32_model.linears().backend} {ppl['fp']:10.3f} | "
            f"ours {int8_model.linears().backend} {ppl['q']:10.3f} ({rel:+.2%}) "
            f"{'PASS' if ok else 'FAIL'}"
        )
        print(
            f"  {'':8s} mean |dlog p| {(lp_q - lp_fp).abs().mean().item():.4f} nats, "
            f"same top-1 token {same_top1:.1%}, fp32 paged vs transformers max |dlog p| "
            f"{(fp32 - hf).abs().max().item():.1e}"
        )
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
