"""Build the embedded default model, models/kogpt2-mini, from scratch on CPU.

A tiny checkpoint with KoGPT-2's architecture (GPT-2), special tokens and ids, trained on
public-domain Korean text that ships inside the `konlpy` wheel (the Constitution of the
Republic of Korea and ten National Assembly bills, ~140 KB). It lets the server, its tests
and its demos run offline with real Korean byte-level BPE. It is not a useful language model.

    python models/build_embedded.py [--out models/kogpt2-mini] [--steps N] [--minutes M]

Deterministic for a given --seed and --steps on the same machine (2 torch threads).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

# Pin threads before torch starts its pools: same thread count -> same float reductions.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from app.engine.stop import byte_decoder  # GPT-2's byte <-> character table, written once

# KoGPT-2 (skt/kogpt2-base-v2) special tokens; the list index is the token id.
SPECIAL_TOKENS = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"]
BOS_ID = EOS_ID = 1  # KoGPT-2 uses </s> for both
PAD_ID = 3
PROMPT = "대한민국은"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4000
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 8
    dropout: float = 0.1
    context: int = 128
    batch_size: int = 16
    steps: int = 320
    warmup: int = 30
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    heldout_fraction: float = 0.05
    seed: int = 1234


# --------------------------------------------------------------------------- corpus


def corpus_files() -> list[Path]:
    try:
        import konlpy
    except ImportError:
        sys.exit("konlpy is required: pip install konlpy (the corpus ships inside its wheel)")
    root = Path(konlpy.__file__).parent / "data" / "corpus"
    files = [root / "kolaw" / "constitution.txt"]
    files += [Path(p) for p in sorted(glob.glob(str(root / "kobill" / "*.txt")))]
    return files


_PAGE_NUMBER = re.compile(r"^\s*-\s*\d+\s*-\s*$")
_TABLE = re.compile(r"^신\s*\S?\s*구조문대비표")  # old/new comparison table: two garbled columns
_ITEM = re.compile(r"^(○|\*|[가-하]\.|\d+\.|[①-⑳]|- )")  # a list item starts a new line
_SENTENCE_END = (".", ":", ")", "」", "”")


def clean_bill(text: str) -> str:
    """Undo the PDF layout of a kobill text: page numbers, form feeds, hard line wraps.

    Wrapped lines are long and separated by a blank line; a wrap that fell between two
    words leaves a trailing space, one inside a word does not. The old/new comparison
    table at the end is dropped: its two columns are interleaved line by line.
    """
    out: list[str] = []
    join_next = False
    for raw in text.replace("\x0c", "\n").split("\n"):
        line = re.sub(r"[ \t]+", " ", raw.strip())
        if _TABLE.match(line):
            break
        if not line or _PAGE_NUMBER.match(line):
            continue
        if join_next and out and not _ITEM.match(line):
            out[-1] += line
        else:
            out.append(line)
        join_next = len(line) >= 28 and not line.endswith(_SENTENCE_END)
        if join_next and raw.rstrip("\n") != raw.rstrip():  # wrapped at a word boundary
            out[-1] += " "
    return "\n".join(s.rstrip() for s in out) + "\n"


def clean_constitution(text: str) -> str:
    lines = [re.sub(r"[ \t]+", " ", line.strip()) for line in text.split("\n")]
    return "\n".join(line for line in lines if line) + "\n"


def load_corpus() -> list[str]:
    docs = []
    for path in corpus_files():
        text = path.read_text(encoding="utf-8")
        docs.append(clean_constitution(text) if path.parent.name == "kolaw" else clean_bill(text))
    return docs


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) whose merges never split a character of the corpus.

    Plain byte-level BPE on 140 KB of Korean learns tokens such as " 전" + the first byte of
    the next syllable; a small model then emits byte fragments that decode to U+FFFD. Here
    BPE is trained over whole characters (each non-ASCII character stands in as one
    private-use placeholder) and then translated to byte level, with merges that assemble
    every corpus character from its UTF-8 bytes ranked first. Every token of the encoded
    corpus is therefore valid UTF-8; byte tokens remain for characters never seen.
    """
    b2u = {b: ch for ch, b in byte_decoder().items()}

    def to_bytelevel(s: str) -> str:
        return "".join(b2u[b] for b in s.encode("utf-8"))

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    placeholder: dict[str, str] = {}  # non-ASCII char -> private-use char
    originals: dict[str, str] = {}  # placeholder -> original char
    for ch in sorted({c for doc in docs for c in doc if ord(c) > 127}):
        assert not 0xE000 <= ord(ch) <= 0xF8FF, "corpus already uses the private-use area"
        placeholder[ch] = chr(0xE000 + len(placeholder))
        originals[placeholder[ch]] = ch

    words: list[str] = []
    for doc in docs:
        for piece, (start, end) in pre.pre_tokenize_str(doc):
            original = doc[start:end]
            assert to_bytelevel(original) == piece, (original, piece)
            words.append("".join(placeholder.get(c) or to_bytelevel(c) for c in original))

    # Tokens that assemble each multi-byte character: prefixes of its UTF-8 bytes.
    build_merges: list[tuple[str, str]] = []
    build_tokens: list[str] = []
    seen: set[str] = set()
    for ch in placeholder:
        enc = to_bytelevel(ch)
        for i in range(2, len(enc) + 1):
            if enc[:i] not in seen:
                seen.add(enc[:i])
                build_merges.append((enc[: i - 1], enc[i - 1]))
                build_tokens.append(enc[:i])
    partial = len(build_tokens) - len(placeholder)  # prefixes that are not whole characters

    alphabet = list(b2u.values()) + list(originals)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - partial,
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    char_bpe = Tokenizer(models.BPE())
    char_bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    char_bpe.train_from_iterator(words, trainer=trainer)
    char_merges = json.loads(char_bpe.to_str())["model"]["merges"]

    def unmap(s: str) -> str:
        return "".join(to_bytelevel(originals[c]) if c in originals else c for c in s)

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for tok in [b2u[b] for b in range(256)] + build_tokens:
        vocab.setdefault(tok, len(vocab))
    merges = list(build_merges)
    for left, right in char_merges:
        a, b = unmap(left), unmap(right)
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    check_tokenizer(tok, docs)
    return tok


def check_tokenizer(tok: Tokenizer, docs: list[str]) -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"{t} must have id {i}"
    fragments = {i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i])}
    for doc in docs:
        ids = tok.encode(doc).ids
        assert tok.decode(ids) == doc, "tokenizer does not round-trip the corpus"
        assert not fragments.intersection(ids), "a corpus character was split into bytes"


def save_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(out))
    # The loader and AutoTokenizer read these; write them whatever this transformers saves.
    specials = {
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    }
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    cfg.update(specials, tokenizer_class="PreTrainedTokenizerFast")
    cfg["model_max_length"] = model_max_length
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return fast


# --------------------------------------------------------------------------- training


def split_tokens(
    tok: Tokenizer, docs: list[str], heldout_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams, documents ended by </s>; the last fraction of each document is held out."""
    train: list[int] = []
    held: list[int] = []
    for doc in docs:
        ids = [*tok.encode(doc).ids, EOS_ID]
        cut = int(len(ids) * (1 - heldout_fraction))
        train += ids[:cut]
        held += ids[cut:]
    return torch.tensor(train), torch.tensor(held)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_model(cfg: TrainConfig, vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=1024,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    return GPT2LMHeadModel(config)


def sample_batch(
    data: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, n_positions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - cfg.context + 1, (cfg.batch_size,), generator=gen)
    batch = torch.stack([data[s : s + cfg.context] for s in starts.tolist()])
    # Random absolute offsets train all 1024 position embeddings, not only the first
    # `context`, so the server's long prompts do not hit untrained positions.
    offsets = torch.randint(0, n_positions - cfg.context + 1, (cfg.batch_size, 1), generator=gen)
    return batch, offsets + torch.arange(cfg.context)


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, data: torch.Tensor, context: int) -> float:
    """Mean next-token loss (eval mode), every token after the first predicted exactly once."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(data) - 1, context - 1):
        chunk = data[s : s + context].unsqueeze(0)
        n = chunk.shape[1] - 1  # predictions in this window (labels are shifted inside)
        if n > 0:
            total += model(input_ids=chunk, labels=chunk).loss.item() * n
            count += n
    return total / max(1, count)


def train_step_seconds(cfg: TrainConfig, vocab_size: int, data: torch.Tensor) -> float:
    """Time a few steps on a throwaway model (before the seeded run, so it changes nothing)."""
    model = make_model(cfg, vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        batch, positions = sample_batch(data, cfg, gen, model.config.n_positions)
        model(input_ids=batch, position_ids=positions, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def train(
    model: GPT2LMHeadModel, data: torch.Tensor, held: torch.Tensor, cfg: TrainConfig
) -> list[tuple[int, float, float]]:
    """AdamW, warmup + cosine; returns (step, smoothed train loss, held-out loss) every 50."""
    gen = torch.Generator().manual_seed(cfg.seed)
    params = list(model.named_parameters())
    groups = [  # no weight decay on biases and LayerNorm gains
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    ema = float("nan")
    history: list[tuple[int, float, float]] = []
    bar = tqdm(range(cfg.steps), desc="train", unit="step", dynamic_ncols=True, mininterval=2)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch, positions = sample_batch(data, cfg, gen, model.config.n_positions)
        loss = model(input_ids=batch, position_ids=positions, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if step == 0 else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            held_loss = evaluate(model, held, cfg.context)  # eval mode: draws no random numbers
            model.train()
            history.append((step + 1, ema, held_loss))
            tqdm.write(
                f"step {step + 1}: train loss (smoothed) {ema:.3f}, "
                f"held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.0f})"
            )
    model.eval()
    return history


@torch.no_grad()
def fragment_probability(model: GPT2LMHeadModel, tok: Tokenizer, data: torch.Tensor) -> float:
    """Mean probability per step of a token that decodes to U+FFFD on its own (a byte
    fragment); this is what sampling without top-k/top-p risks emitting."""
    frag = [i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i])]
    probs = torch.softmax(model(input_ids=data[:1024].unsqueeze(0)).logits[0], dim=-1)
    return probs[:, frag].sum(dim=-1).mean().item()


# --------------------------------------------------------------------------- output


def greedy(model: GPT2LMHeadModel, tok: PreTrainedTokenizerFast, prompt: str, **kw: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48, **kw
        )
    return tok.decode(out[0], skip_special_tokens=True)


def write_readme(out: Path, cfg: TrainConfig, stats: dict[str, str]) -> None:
    text = README_TEMPLATE.format(cfg=cfg, **stats)
    (out / "README.md").write_text(text, encoding="utf-8")


README_TEMPLATE = """\
---
language: ko
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, kogpt2, korean, tiny, test-model]
---

# kogpt2-mini

A tiny Korean GPT-2 with the architecture, tokenizer conventions and special tokens of
[skt/kogpt2-base-v2](https://huggingface.co/skt/kogpt2-base-v2), trained from scratch on
{chars} characters of Korean legal text. It is kogpt-serve's embedded default model: it
lets the server, its tests and demos run offline. It memorises its corpus and knows
little else; it is not for real use.

| | |
| --- | --- |
| architecture | `GPT2LMHeadModel` (GPT-2), tied input/output embeddings |
| shape | {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, n_positions 1024 |
| parameters | {params}, float32 safetensors |
| tokenizer | byte-level BPE (GPT-2 style), vocab {vocab}, trained on the same corpus |
| special tokens | as KoGPT-2: `<s>` 0, `</s>` 1, `<usr>` 2, `<pad>` 3, `<sys>` 4, |
| | `<unk>` 5, `<mask>` 6; bos = eos = `</s>` (1), pad = `<pad>` (3) |

## Data and license

The text ships inside the [konlpy](https://pypi.org/project/konlpy/) wheel
(`konlpy/data/corpus`, 140 KB): `kolaw/constitution.txt`, the Constitution of the
Republic of Korea, and `kobill/*.txt`, ten bills and motions filed in the 18th National
Assembly (November 2010). Article 7 of the Copyright Act of the Republic of Korea
excludes constitutions, acts and decrees, and notices and similar official documents of
the State, from copyright protection; the texts are public domain. The weights and
tokenizer in this folder are released under the Apache License 2.0, like kogpt-serve.

Cleaning: page numbers, form feeds and the hard line wraps of the bills' PDF layout are
removed, and so is each bill's old/new comparison table (its two columns are interleaved
line by line in the text dump). That leaves {chars} characters: {n_train} training tokens
and {n_held} held-out tokens (the last {heldout_pct}% of every document).

## How it was made

```
{command}
```

`models/build_embedded.py` trains the tokenizer (BPE over whole characters, then expressed
at byte level with the merges that assemble each character from its UTF-8 bytes ranked
first, so no token of the corpus is a broken byte fragment), then the model: AdamW
(lr {cfg.lr}, betas 0.9/0.98, weight decay {cfg.weight_decay}), {cfg.warmup} warmup steps
then cosine decay, dropout {cfg.dropout}, {cfg.steps} steps of {cfg.batch_size} x
{cfg.context}-token windows, position ids offset at random so that all 1024 positions are
trained, seed {cfg.seed}, 2 CPU threads. Build time {minutes} minutes (wall clock) on {machine}.
Same seed and steps on the same machine give the same files.

## Results

| | |
| --- | --- |
| final train loss (eval mode, whole train split) | {train_loss} |
| held-out loss / perplexity | {heldout_loss} / {heldout_ppl} |

| step | train loss (smoothed, dropout on) | held-out perplexity |
| --- | --- | --- |
{curve}

With so little data the model memorises: held-out perplexity is lowest early on and then
rises while the training loss falls. The default step count trades it for fluent,
law-like greedy text, which is what the server's tests and demos need.

Greedy continuation of `{prompt}` (`no_repeat_ngram_size=3`, 48 new tokens):

> {sample_nr}

Plain greedy:

> {sample_plain}

## Limitations

- It knows only the Constitution and these bills; other prompts get legal boilerplate.
- Characters absent from the corpus are encoded as raw UTF-8 byte tokens, which the model
  never saw in training.
- A byte-fragment token (one that is not valid UTF-8 on its own) gets {frag_pct}% of the
  probability per step on held-out text. Greedy decoding and top-k/top-p sampling avoid
  them; pure sampling at temperature 1 occasionally emits one, which decodes to U+FFFD.

## Use

```python
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

tok = PreTrainedTokenizerFast.from_pretrained(
    "models/kogpt2-mini",
    bos_token="</s>",
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
    mask_token="<mask>",
)
model = GPT2LMHeadModel.from_pretrained("models/kogpt2-mini")
ids = tok("{prompt}", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=32, no_repeat_ngram_size=3)[0]))
```
"""


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "kogpt2-mini")
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="fit training into about this many minutes: lowers --steps after "
        "timing a few steps (the step count used is printed and recorded)",
    )
    ap.add_argument("--seed", type=int, default=defaults.seed)
    args = ap.parse_args(argv)

    started = time.monotonic()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)  # denormal floats take a slow path on x86 CPUs
    cfg = replace(defaults, steps=args.steps, seed=args.seed)
    out: Path = args.out.resolve()
    tmp = out.with_name(out.name + ".tmp")  # build aside, swap in at the end
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    docs = load_corpus()
    print(f"corpus: {len(docs)} documents, {sum(len(d) for d in docs):,} characters")
    tok = train_tokenizer(docs, cfg.vocab_size)
    fast = save_tokenizer(tok, tmp, model_max_length=1024)
    vocab = tok.get_vocab_size()
    train_ids, held_ids = split_tokens(tok, docs, cfg.heldout_fraction)
    print(f"tokenizer: vocab {vocab}; tokens: {len(train_ids):,} train, {len(held_ids):,} held out")

    if args.minutes is not None:
        per_step = train_step_seconds(cfg, vocab, train_ids)
        fit = max(cfg.warmup + 1, int(args.minutes * 60 / per_step))
        if fit < cfg.steps:
            cfg = replace(cfg, steps=fit)
        print(f"{per_step:.2f} s/step -> {cfg.steps} steps (reproduce with --steps {cfg.steps})")

    model = make_model(cfg, vocab)  # seeds torch
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    history = train(model, train_ids, held_ids, cfg)
    train_loss = evaluate(model, train_ids, cfg.context)
    held_loss = evaluate(model, held_ids, cfg.context)
    print(
        f"train loss {train_loss:.3f}; held-out loss {held_loss:.3f}, "
        f"perplexity {math.exp(held_loss):.1f}"
    )

    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    )
    sample_nr = greedy(model, fast, PROMPT, no_repeat_ngram_size=3)
    sample_plain = greedy(model, fast, PROMPT)
    print(f"greedy, no_repeat_ngram_size=3: {sample_nr!r}\ngreedy: {sample_plain!r}")
    frag_p = fragment_probability(model, tok, held_ids)
    model.save_pretrained(str(tmp), safe_serialization=True)
    model.generation_config.save_pretrained(str(tmp))

    command = "python models/build_embedded.py"
    if out != (REPO_ROOT / "models" / "kogpt2-mini").resolve():
        command += f" --out {args.out}"
    if cfg.steps != defaults.steps:
        command += f" --steps {cfg.steps}"
    if cfg.seed != defaults.seed:
        command += f" --seed {cfg.seed}"
    write_readme(
        tmp,
        cfg,
        {
            "params": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
            "vocab": str(vocab),
            "heldout_pct": f"{cfg.heldout_fraction * 100:g}",
            "command": command,
            "minutes": f"{(time.monotonic() - started) / 60:.1f}",
            "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads "
            f"(torch {torch.__version__})",
            "chars": f"{sum(len(d) for d in docs):,}",
            "n_train": f"{len(train_ids):,}",
            "n_held": f"{len(held_ids):,}",
            "curve": "\n".join(
                f"| {step} | {ema:.3f} | {math.exp(held):.0f} |" for step, ema, held in history
            ),
            "frag_pct": f"{frag_p * 100:.2g}",
            "train_loss": f"{train_loss:.3f}",
            "heldout_loss": f"{held_loss:.3f}",
            "heldout_ppl": f"{math.exp(held_loss):.1f}",
            "prompt": PROMPT,
            "sample_nr": sample_nr.replace("\n", " / "),
            "sample_plain": sample_plain.replace("\n", " / "),
        },
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out} in {(time.monotonic() - started) / 60:.1f} min")
    if "\ufffd" in sample_nr + sample_plain:
        print("error: the greedy sample contains U+FFFD (broken UTF-8)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
