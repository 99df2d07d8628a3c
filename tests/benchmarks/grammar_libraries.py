"""Grammar library comparison (a script, never a test): llguidance vs xgrammar vs outlines-core.

    python -m tests.benchmarks.grammar_libraries [--libs llguidance,xgrammar,outlines_core]

Only llguidance is a dependency; install the others next to it for a comparison run, e.g.
`pip install --target /tmp/gramlibs --no-deps xgrammar apache-tvm-ffi outlines-core` and
`PYTHONPATH=/tmp/gramlibs python -m tests.benchmarks.grammar_libraries`.

For each library and tokenizer (the embedded byte-level BPE, vocab 3262, and a byte-level BPE
of KoGPT-2's size, 51200, trained here on generated Korean text since the real one is not
offline), it measures: tokenizer set-up, grammar compile time (a JSON schema with Korean
keys and string fields, and a regex), the per-token mask time while feeding a valid Korean
output (fill + advance), whether every token of that output was allowed (Korean syllables
are split across tokens), and random walks: tokens drawn uniformly from each mask until
the grammar ends; every walk's bytes must decode as UTF-8 and parse / fullmatch.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app.engine.stop import token_bytes_table

ROOT = Path(__file__).resolve().parents[2]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "이름": {"type": "string", "maxLength": 12},
        "나이": {"type": "integer", "minimum": 0, "maximum": 150},
        "도시": {"enum": ["서울", "부산", "대구"]},
        "소개": {"type": "string", "maxLength": 24},
    },
    "required": ["이름", "나이", "도시", "소개"],
    "additionalProperties": False,
}
JSON_TARGETS = [  # one of these is in each library's whitespace convention
    {"이름": "홍길동", "나이": 30, "도시": "서울", "소개": "대한민국 국민입니다"},
]
REGEX = r"(서울|부산|대구)시 [가-힣]{2,4}구 [0-9]{1,3}번지"
REGEX_TARGET = "서울시 종로구 12번지"


def synthetic_tokenizer(vocab: int, cache: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab` tokens with KoGPT-2's special tokens, trained on Zipf-
    distributed generated Korean words (the real 51200 tokenizer is not available offline)."""
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache))
    from tokenizers import ByteLevelBPETokenizer

    rng = random.Random(0)
    syllables = [chr(c) for c in range(0xAC00, 0xD7A4)]
    lexicon = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(60000)]
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    lines = []
    for _ in range(40000):
        words = rng.choices(lexicon, weights, k=12)
        lines.append(" ".join(words) + rng.choice([".", ",", ' "', ": 1", " 2024년", "?"]))
    specials = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab, min_frequency=1, special_tokens=specials)
    cache.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>",
    )  # fmt: skip
    fast.save_pretrained(str(cache))
    return fast


class Backend:
    """One library behind a common surface: compile, then a matcher per output."""

    name = ""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        self.vocab = vocab
        self.eos = int(tokenizer.eos_token_id)

    def compile(self, kind: str, value: Any) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matcher: Any, mask: np.ndarray) -> None: ...
    def advance(self, matcher: Any, token: int) -> bool: ...
    def done(self, matcher: Any) -> bool: ...


class LLGuidance(Backend):
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        super().__init__(tokenizer, vocab)
        import llguidance
        import llguidance.hf

        self.lib = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile(self, kind: str, value: Any) -> Any:
        m = self.lib.LLMatcher
        if kind == "json":  # the server's default: one space after ',' and ':', no other
            grammar = m.grammar_from_json_schema(value, defaults={"whitespace_flexible": False})
        else:
            grammar = m.grammar_from_regex(value)
        matcher = m(self.tok, grammar)  # compiles lazily per matcher; keep it as the template
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.lib.LLMatcher(self.tok, compiled)

    def fill(self, matcher: Any, mask: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())


class XGrammar(Backend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        super().__init__(tokenizer, vocab)
        import xgrammar

        self.lib = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def compile(self, kind: str, value: Any) -> Any:
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(value), any_whitespace=False)
        return self.compiler.compile_regex(value)

    def matcher(self, compiled: Any) -> Any:
        return self.lib.GrammarMatcher(compiled)

    def fill(self, matcher: Any, mask: np.ndarray) -> None:
        import torch

        matcher.fill_next_token_bitmask(torch.from_numpy(mask))

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())


class OutlinesCore(Backend):
    name = "outlines_core"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        super().__init__(tokenizer, vocab)
        import outlines_core

        self.lib = outlines_core
        table = token_bytes_table(tokenizer)
        special = set(tokenizer.all_special_ids)
        words: dict[bytes, list[int]] = {}
        for tid, piece in enumerate(table):
            if tid not in special and piece:
                words.setdefault(piece, []).append(tid)
        self.vocabulary = outlines_core.Vocabulary(self.eos, words)

    def compile(self, kind: str, value: Any) -> Any:
        if kind == "json":
            from outlines_core.json_schema import build_regex_from_schema

            value = build_regex_from_schema(json.dumps(value))
        return self.lib.Index(value, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.lib.Guide(compiled)

    def fill(self, matcher: Any, mask: np.ndarray) -> None:
        matcher.write_mask_into(mask.ctypes.data, mask.size, 4)

    def advance(self, matcher: Any, token: int) -> bool:
        try:
            matcher.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_finished())


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (LLGuidance, XGrammar, OutlinesCore)}


def allowed(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def feed(backend: Backend, compiled: Any, ids: list[int]) -> tuple[bool, list[float]]:
    """Feed a valid output token by token; (every token allowed and eos at the end, times)."""
    matcher = backend.matcher(compiled)
    mask = np.zeros((backend.vocab + 31) // 32, dtype=np.int32)
    times = []
    ok = True
    for token in [*ids, backend.eos]:
        start = time.perf_counter()
        backend.fill(matcher, mask)
        ok = ok and allowed(mask, token)
        if token != backend.eos:  # eos ends the output; outlines-core has no eos transition
            ok = backend.advance(matcher, token) and ok
        times.append(time.perf_counter() - start)
    return ok, times


def walk(backend: Backend, compiled: Any, rng: random.Random, table: list[bytes]) -> bytes:
    """Uniformly random allowed tokens (eos taken as soon as allowed) until the grammar ends."""
    matcher = backend.matcher(compiled)
    mask = np.zeros((backend.vocab + 31) // 32, dtype=np.int32)
    out = b""
    for _ in range(400):
        backend.fill(matcher, mask)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: backend.vocab]
        choices = np.flatnonzero(bits).tolist()
        if not choices:
            raise AssertionError("empty mask")
        if backend.eos in choices:
            return out
        token = rng.choice(choices)
        out += table[token] if token < len(table) else b""
        if not backend.advance(matcher, token):
            raise AssertionError(f"allowed token {token} was refused")
    raise AssertionError("walk did not finish in 400 tokens")


def check_json(data: bytes) -> bool:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    props = SCHEMA["properties"]
    return (
        set(obj) == set(props)
        and isinstance(obj["이름"], str)
        and len(obj["이름"]) <= 12
        and isinstance(obj["나이"], int)
        and 0 <= obj["나이"] <= 150
        and obj["도시"] in props["도시"]["enum"]
        and len(obj["소개"]) <= 24
    )


def check_regex(data: bytes) -> bool:
    try:
        return re.fullmatch(REGEX, data.decode("utf-8")) is not None
    except UnicodeDecodeError:
        return False


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(name: str, tokenizer: Any, vocab: int, walks: int) -> dict[str, Any]:
    backend, init_s = timed(lambda: BACKENDS[name](tokenizer, vocab))
    table = token_bytes_table(tokenizer)
    rng = random.Random(0)
    result: dict[str, Any] = {"library": name, "vocab": vocab, "tokenizer_init_s": init_s}
    cases = [
        ("json", SCHEMA, [json.dumps(t, ensure_ascii=False, separators=sep)
                          for t in JSON_TARGETS for sep in ((",", ":"), (", ", ": "))],
         check_json),
        ("regex", REGEX, [REGEX_TARGET], check_regex),
    ]  # fmt: skip
    for kind, value, targets, check in cases:
        compiled, compile_s = timed(lambda kind=kind, value=value: backend.compile(kind, value))
        fed_ok, times = False, []
        for text in targets:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            fed_ok, times = feed(backend, compiled, ids)
            if fed_ok:
                break
        outputs = []
        for _ in range(walks):
            try:
                outputs.append(walk(backend, compiled, rng, table))
            except AssertionError as err:
                outputs.append(str(err).encode())
        result[kind] = {
            "compile_s": compile_s,
            "valid_output_accepted": fed_ok,
            "mask_us_per_token_median": statistics.median(times) * 1e6,
            "mask_us_per_token_max": max(times) * 1e6,
            "tokens_fed": len(times),
            "random_walks_valid": sum(check(o) for o in outputs),
            "random_walks": walks,
            "example_walk": outputs[0].decode("utf-8", "replace") if outputs else "",
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--libs", default="llguidance,xgrammar,outlines_core")
    parser.add_argument("--walks", type=int, default=20)
    parser.add_argument("--big-vocab", type=int, default=51200)
    parser.add_argument("--cache", default="/tmp/kogpt-bpe-51200")
    args = parser.parse_args()
    small = AutoTokenizer.from_pretrained(str(ROOT / "models" / "kogpt2-mini"))
    big, build_s = timed(lambda: synthetic_tokenizer(args.big_vocab, Path(args.cache)))
    print(f"# synthetic {len(big)}-token byte-level BPE ready in {build_s:.1f} s")
    results = []
    for tokenizer in (small, big):
        vocab = max(len(tokenizer), 3262)
        for name in args.libs.split(","):
            try:
                res = measure(name, tokenizer, vocab, args.walks)
            except ImportError as err:
                res = {"library": name, "vocab": vocab, "error": f"not installed: {err}"}
            results.append(res)
            print(json.dumps(res, ensure_ascii=False))


if __name__ == "__main__":
    main()
