"""Per-sequence token constraints: llguidance matchers and fixed allowed sets (no torch).

`ConstraintFactory` belongs to one engine: on the first grammar request it wraps the
tokenizer for llguidance once (`LLTokenizer`, ~0.1 s for the embedded 3262-token vocabulary,
~2 s at 51200), sized to the model's logits width so ids past the tokenizer's vocabulary
(GPT-2 checkpoints may pad the LM head) are never allowed. Each sequence gets its own
`TokenConstraint` at admission, and every forked sibling (num_return_sequences) a fresh one:
siblings branch from the prompt. The matcher lives in the sequence's `data`, so a recompute
preemption (which keeps the generated tokens) leaves it in step with them.

Each step `token_masks` fills the allowed-token masks of all constrained rows in one
parallel llguidance call, the sampler adds -inf where a token is not allowed (grammar_mask.py,
at prefix_allowed_tokens_fn's place in transformers' processor order), and `advance` feeds
the chosen token. EOS: llguidance marks the tokenizer's eos as allowed when the grammar
accepts; that bit is replaced by the request's own eos ids (none with ignore_eos). When the
grammar can take no further token the sequence ends right after its last token with
finish reason eos, without spending a step on the eos token itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.hf
import numpy as np

from app.engine.core.request import FinishReason
from app.options.constraints import GrammarSpec
from app.options.params import SamplingParams


class GrammarError(RuntimeError):
    """The grammar refused a token the sampler chose (a library inconsistency), or left no
    token to choose; the request fails with this message."""


@dataclass
class TokenConstraint:
    """One sequence's constraint: a grammar matcher, a fixed allowed set, or both."""

    matcher: llguidance.LLMatcher | None
    allowed_ids: tuple[int, ...] | None
    eos_ids: tuple[int, ...]  # the request's stop tokens, allowed where the grammar accepts
    lib_eos: int  # the eos id llguidance uses in its masks
    factory: ConstraintFactory | None = None  # its executor fills the masks in parallel
    num_tokens: int = field(default=0)  # tokens fed to the matcher

    def advance(self, token: int, reason: FinishReason | None) -> FinishReason | None:
        """Feed the sequence's new token; `reason` is what the stop checks decided. Returns
        the finish reason: eos when the grammar is complete (it can take no more tokens)."""
        if reason is not None or self.matcher is None:
            return reason  # the sequence ends here anyway: nothing to feed
        if not self.matcher.consume_token(token):
            raise GrammarError(f"grammar refused token {token}: {self.matcher.get_error()}")
        self.num_tokens += 1
        return FinishReason.EOS if self.matcher.is_stopped() else None


class ConstraintFactory:
    """Builds each sequence's TokenConstraint; the llguidance tokenizer is made once, lazily."""

    def __init__(self, tokenizer: Any, vocab_size: int, num_threads: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = max(int(vocab_size), len(tokenizer))  # the logits width
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=self.vocab_size
            )
        return self._ll_tokenizer

    @property
    def executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self.num_threads)
        return self._executor

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.ll_tokenizer, spec.grammar, log_level=0)
        if matcher.is_error():  # validated at the API; a tokenizer-specific failure lands here
            raise GrammarError(f"grammar: {matcher.get_error()}")
        return matcher

    def make(self, params: SamplingParams) -> TokenConstraint | None:
        """The constraint for a new sequence of this request (None when it has none)."""
        spec: GrammarSpec | None = getattr(params, "grammar", None)
        allowed = getattr(params, "allowed_token_ids", None)
        if spec is None and allowed is None:
            return None
        matcher = None if spec is None else self.matcher(spec)
        lib_eos = self.ll_tokenizer.eos_token if spec is not None else -1
        return TokenConstraint(
            matcher,
            None if allowed is None else tuple(allowed),
            tuple(params.eos_token_ids),
            lib_eos,
            self,
        )


def _unpack(bitmask: np.ndarray, width: int) -> np.ndarray:
    """int32 words (bit k of word w = token 32 w + k) -> bool [rows, width]."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
    if bits.shape[1] < width:
        bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
    return bits[:, :width].astype(bool)


def token_masks(constraints: Sequence[TokenConstraint], width: int) -> np.ndarray:
    """bool [len(constraints), width]: which tokens each row may take. Rows sharing a matcher
    (the n copies of a prompt row on a request's first token) are computed once."""
    out = np.ones((len(constraints), width), dtype=bool)
    distinct: dict[int, int] = {}
    matchers: list[llguidance.LLMatcher] = []
    for c in constraints:
        if c.matcher is not None and id(c.matcher) not in distinct:
            distinct[id(c.matcher)] = len(matchers)
            matchers.append(c.matcher)
    if matchers:
        factory = next(c.factory for c in constraints if c.matcher is not None)
        if factory is None:
            raise GrammarError("grammar rows need the engine's ConstraintFactory")
        words = (factory.vocab_size + 31) // 32
        bitmask = np.zeros((len(matchers), words), dtype=np.int32)
        factory.executor.unsafe_compute_mask_ptr(
            [(m, k) for k, m in enumerate(matchers)], bitmask.ctypes.data, words * 4, len(matchers)
        )
        grammar_rows = _unpack(bitmask, width)
        for i, c in enumerate(constraints):
            if c.matcher is None:
                continue
            row = grammar_rows[distinct[id(c.matcher)]]
            accepting = 0 <= c.lib_eos < width and bool(row[c.lib_eos])
            out[i] = row
            if 0 <= c.lib_eos < width:
                out[i, c.lib_eos] = False
            if accepting:  # the grammar may end here: the request's eos ids end it
                out[i, [e for e in c.eos_ids if e < width]] = True
    for i, c in enumerate(constraints):
        if c.allowed_ids is not None:
            fixed = np.zeros(width, dtype=bool)
            fixed[[t for t in c.allowed_ids if t < width]] = True
            out[i] &= fixed
    return out
