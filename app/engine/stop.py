"""Stop checks after each new token: eos, length, stop strings (no torch).

Semantics follow transformers 5.23's stopping criteria for one sequence:
- EosTokenCriteria: the last token is one of the eos ids. (Banning eos before min length is
  the sampler's job, as in HF's MinLength processors.)
- MaxLengthCriteria: len(prompt + output) >= max_length.
- StopStringCriteria: a stop string occurs in the tokens' text and ENDS INSIDE the newest token
  (the token may carry more text after it). Matching runs on the tokens' raw bytes, prompt
  included (a stop string may start in the prompt), special tokens as their literal text;
  `token_bytes_table` builds that byte view of the vocabulary the way HF does.
When several hold at once the reason is eos, then stop_sequence, then length.

Token ids always match model.generate: the tokens of the stop string stay in the output. The
returned TEXT is cut before the stop string (TGI / OpenAI behaviour); `StopStringTextFilter`
does that on the streamed text and holds back a tail that could still become a stop string.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from app.engine.core.request import FinishReason
from app.options.params import SamplingParams

__all__ = ["FinishReason", "StopChecker", "StopStringTextFilter", "token_bytes_table"]


class StopChecker:
    """Decides whether one sequence is finished after a token was appended."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_len: int,
        token_bytes: Sequence[bytes] | None = None,
    ) -> None:
        self.eos_token_ids = frozenset(params.eos_token_ids)
        self.stop_length = params.stop_length(prompt_len)
        self.stop_strings = [s.encode("utf-8") for s in params.stop_strings]
        if self.stop_strings and token_bytes is None:
            # HF raises the same way when stop strings come without a tokenizer.
            raise ValueError("stop_strings need the tokenizer's token_bytes_table")
        self._token_bytes: Sequence[bytes] = token_bytes or ()
        self._max_stop_len = max((len(s) for s in self.stop_strings), default=0)

    def check(self, token_ids: Sequence[int]) -> FinishReason | None:
        """`token_ids` is the whole sequence (prompt + output) including the new token."""
        if token_ids[-1] in self.eos_token_ids:
            return FinishReason.EOS
        if self.stop_strings and self._ends_with_stop_string(token_ids):
            return FinishReason.STOP
        if len(token_ids) >= self.stop_length:
            return FinishReason.LENGTH
        return None

    def _bytes(self, token_id: int) -> bytes:
        table = self._token_bytes
        # HF clamps unknown ids to a dummy row that matches nothing.
        return table[token_id] if 0 <= token_id < len(table) else b""

    def _ends_with_stop_string(self, token_ids: Sequence[int]) -> bool:
        last = self._bytes(token_ids[-1])
        if not last:
            return False
        # Bytes before the newest token that a match could start in; like HF, look back at most
        # max_stop_len tokens in all (every token is at least one byte).
        parts = [last]
        before = 0
        i = len(token_ids) - 2
        while before < self._max_stop_len - 1 and i >= 0 and len(parts) < self._max_stop_len:
            piece = self._bytes(token_ids[i])
            parts.append(piece)
            before += len(piece)
            i -= 1
        tail = b"".join(reversed(parts))
        new_start = len(tail) - len(last)
        # A match must end after new_start, i.e. start at new_start - len(s) + 1 or later.
        return any(tail.find(s, max(0, new_start - len(s) + 1)) != -1 for s in self.stop_strings)


class StopStringTextFilter:
    """Streams text while hiding stop strings: the API's text ends before the stop string.

    Per step: `push(delta)` while the sequence runs; it returns the text that can no longer be
    part of a stop string (the last `max_len - 1` characters are held back). On the step that
    finishes the sequence, do not push: call `finish(delta + detokenizer.flush(), reason)`,
    which returns the rest, cut before the stop string when the reason is a stop string.
    `context` is text before the output (the prompt's tail) so a stop string that began in
    the prompt also cuts the output (to "").
    """

    def __init__(self, stop_strings: Sequence[str], context: str = "") -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self._hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self._context = context[-self._hold :] if self._hold else ""
        self._pending = ""

    def push(self, delta: str) -> str:
        if not self.stop_strings:
            return delta
        self._pending += delta
        if len(self._pending) <= self._hold:
            return ""
        cut = len(self._pending) - self._hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        if self._hold:
            self._context = (self._context + out)[-self._hold :]
        return out

    def finish(self, text: str = "", reason: FinishReason | None = None) -> str:
        text, self._pending = self._pending + text, ""
        if reason is not FinishReason.STOP or not self.stop_strings:
            return text
        joined = self._context + text
        base = len(self._context)
        # Only matches that reach into the unemitted text count (earlier ones were not stops).
        starts = [
            pos
            for s in self.stop_strings
            if (pos := joined.find(s, max(0, base - len(s) + 1))) != -1
        ]
        if not starts:  # matched on token bytes only (e.g. a skipped special token's text)
            return text
        return text[: max(0, min(starts) - base)]


def _matching_mode(tokenizer: Any) -> str | None:
    """StopStringCriteria._get_stop_string_matching_mode: how tokens map to bytes."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    if decoder.__class__.__name__ == "ByteLevel":
        return "byte_level"
    state = getattr(decoder, "__getstate__", lambda: None)()
    try:
        config = json.loads(state) if isinstance(state, (str, bytes)) else None
    except json.JSONDecodeError:
        config = None

    def has(node: Any, kind: str) -> bool:
        if isinstance(node, dict):
            return node.get("type") == kind or any(has(v, kind) for v in node.values())
        if isinstance(node, list):
            return any(has(v, kind) for v in node)
        return False

    if has(config, "ByteFallback"):
        return "byte_fallback"
    if has(config, "ByteLevel"):
        return "byte_level"
    return None


def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes_table(tokenizer: Any) -> list[bytes]:
    """Bytes of every token id as StopStringCriteria.clean_tokenizer_vocab sees them."""
    mode = _matching_mode(tokenizer)
    vocab: dict[str, int] = tokenizer.get_vocab()
    table = [b""] * (max(vocab.values()) + 1)
    decoder = byte_decoder() if mode == "byte_level" else None
    prefix = "abcdef"  # HF's static prefix trick for tokens with no direct byte form
    base_tokens: list[str] | None = None
    for token, idx in vocab.items():
        raw: bytes | None = None
        if decoder is not None and all(c in decoder for c in token):
            raw = bytes(decoder[c] for c in token)
        elif (
            mode == "byte_fallback"
            and len(token) == 6
            and token.startswith("<0x")
            and token.endswith(">")
            and all(c in "0123456789abcdefABCDEF" for c in token[3:5])
        ):
            raw = bytes([int(token[3:5], 16)])
        if raw is None:
            if base_tokens is None:
                ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
                base_tokens = tokenizer.convert_ids_to_tokens(ids)
            text = tokenizer.convert_tokens_to_string([*base_tokens, token])
            raw = text[text.index(prefix) + len(prefix) :].encode("utf-8")
        table[idx] = raw
    return table
