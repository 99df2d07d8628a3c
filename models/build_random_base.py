"""Write a random-weight checkpoint with the exact shape of skt/kogpt2-base-v2, offline.

For benchmarks: the real model's cost (12 layers, 768 wide, 12 heads, vocab 51200,
1024 positions, ~125M parameters) without downloading it. The text it produces is noise.
The tokenizer is the embedded model's (vocab 3262 <= 51200, same special tokens and ids).

    python models/build_random_base.py [--out models/kogpt2-base-random] [--seed 0]

The default output folder is git-ignored (~500 MB of float32 safetensors).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "models" / "kogpt2-base-random"
DEFAULT_TOKENIZER = REPO_ROOT / "models" / "kogpt2-mini"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# skt/kogpt2-base-v2's config.json, minus training-only metadata.
KOGPT2_BASE = {
    "vocab_size": 51200,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 1,
    "pad_token_id": 3,
}


def build(out: Path, seed: int = 0, tokenizer_dir: Path = DEFAULT_TOKENIZER) -> Path:
    missing = [f for f in TOKENIZER_FILES if not (tokenizer_dir / f).is_file()]
    if missing:
        raise SystemExit(
            f"{tokenizer_dir} lacks {', '.join(missing)}: build the embedded model first "
            "(python models/build_embedded.py) or pass --tokenizer-from DIR"
        )
    torch.manual_seed(seed)  # weights depend on the seed only
    config = GPT2Config(**KOGPT2_BASE)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    (out / "README.md").write_text(
        "# kogpt2-base-random\n\nRandom weights (seed "
        f"{seed}) in the exact shape of skt/kogpt2-base-v2, for benchmarks only; the "
        "tokenizer is models/kogpt2-mini's. Made by `python models/build_random_base.py`.\n",
        encoding="utf-8",
    )
    for path in out.iterdir():  # save_pretrained writes 0600: a container's user reads it too
        path.chmod(path.stat().st_mode | 0o044)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, default=DEFAULT_TOKENIZER)
    args = ap.parse_args(argv)
    started = time.monotonic()
    out = build(args.out, args.seed, args.tokenizer_from)
    print(f"wrote {out} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
