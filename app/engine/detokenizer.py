"""Incremental, UTF-8-safe detokenization (no torch).

Byte-level BPE (GPT-2, KoGPT-2) splits a 3-byte Hangul syllable across tokens; decoding a
token that ends mid-character yields U+FFFD. We use the prefix-offset / read-offset scheme of
vLLM and TGI: each step decodes only the window `ids[prefix_offset:]` and the already emitted
part `ids[prefix_offset:read_offset]`; the delta is the difference. When the window text ends
with U+FFFD the tail may be an incomplete character, so nothing is emitted and the offsets stay.

Why the concatenated deltas (plus `flush()`) equal `tokenizer.decode(output_ids)` exactly: a
byte-level decoder concatenates the tokens' bytes (skipped special tokens removed) and decodes
them lossily. Decoding from a position where no character is pending gives the same text as
decoding everything; `read_offset` only moves to such positions (the window decoded without a
trailing U+FFFD), and `prefix_offset` is always a former `read_offset`. A trailing U+FFFD that
is final (an invalid byte, or a literal U+FFFD) is merely emitted later: at the next clean
position or at `flush()`.

Only output tokens are decoded, never the prompt: the contract is equality with
`decode(output_ids)`, and a prompt given as ids may end mid-character (HF's decode of the
output then starts with U+FFFD, and so do we). The prompt ids are kept for callers only.
Cost: each step decodes the last emitted chunk plus the new tokens, O(window); a run of
invalid bytes (garbage output only) keeps the window open until a clean position arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens, one delta per `add`."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.prompt_token_ids = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self._decode = _make_decode(tokenizer, skip_special_tokens)
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window (an earlier read offset)
        self._read_offset = 0  # text of ids[:read_offset] has been emitted

    @property
    def token_ids(self) -> list[int]:
        """Output token ids added so far (a copy)."""
        return list(self._ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose text is held back (an incomplete character at the end)."""
        return len(self._ids) - self._read_offset

    def add(self, token_ids: Sequence[int] | int) -> str:
        """Append output token(s); return the newly complete text (maybe "")."""
        if isinstance(token_ids, int):
            self._ids.append(token_ids)
        else:
            self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (the sequence is finished)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        new_text = self._decode(window)
        if not final and new_text.endswith(_REPLACEMENT):
            return ""  # maybe an incomplete character: wait for more bytes
        done = self._read_offset - self._prefix_offset
        prefix_text = self._decode(window[:done]) if done else ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


def _make_decode(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """Decode exactly as `tokenizer.decode(ids, skip_special_tokens=...)` would, cheaply."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # PreTrainedTokenizerFast.decode is the backend decode plus optional space cleanup;
        # without the cleanup, calling the backend directly skips Python overhead.
        def decode_backend(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return decode_backend

    def decode_public(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    return decode_public
