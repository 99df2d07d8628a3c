"""The one token -> output path: every lane's generated tokens become `SequenceOutput`s here.

Whatever chose a token (the batched sampler, beam search, a class-B method, the exact lane's
`generate`), the same steps make what the client sees:
- the stop check (eos, length, stop strings: generate's criteria, stop.py);
- UTF-8-safe incremental detokenization (detokenizer.py);
- the stop-string text filter (the text is cut before a stop string, a possible prefix is
  held back until it is decided; `include_stop_str_in_output` keeps the text whole);
- the top-n alternatives, from the distribution the token was chosen from.
Whole sequences delivered at once (beam results) are cut where the stop checks end them and
their text is shared among their tokens here (`GeneratedToken.text`), so the HTTP side
never decodes a generated token again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from app.engine.core.request import FinishReason
from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.outputs import GeneratedToken, PromptLogprob, SequenceOutput
from app.engine.stop import StopChecker, StopStringTextFilter
from app.options.params import SamplingParams


class SequenceText:
    """One sequence's streamed text: incremental detokenizer + stop-string filter."""

    def __init__(
        self,
        tokenizer: Any,
        context_ids: Sequence[int],
        stop_strings: Sequence[str],
        skip_special_tokens: bool = True,
    ):
        self.detok = IncrementalDetokenizer(tokenizer, list(context_ids), skip_special_tokens)
        self.filter = StopStringTextFilter(stop_strings)

    def add(self, token: int, reason: FinishReason | None) -> str:
        """The text this token completes (all that is left when `reason` ends the sequence)."""
        delta = self.detok.add(token)
        if reason is None:
            return self.filter.push(delta)
        return self.filter.finish(delta + self.detok.flush(), reason)

    def finish(self, reason: FinishReason) -> str:
        """What is still held back when the sequence ends without a new token."""
        return self.filter.finish(self.detok.flush(), reason)


class OutputProcessor:
    """One request's outputs: its stop checker and the text path of each sequence."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        tokenizer: Any,
        token_bytes: Callable[[], list[bytes]],
    ) -> None:
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.tokenizer = tokenizer
        table = token_bytes() if params.stop_strings else None
        self.checker = StopChecker(params, len(self.prompt_ids), table)
        # The stop strings the text filter cuts (none when the text keeps them).
        self.cut_strings = [] if params.include_stop_str_in_output else list(params.stop_strings)
        # Prompt log-probs, filled chunk by chunk as the prefill computes them; position 0
        # has none (no context), as in OpenAI's echo, vLLM and TGI.
        self.prompt_logprobs: list[PromptLogprob | None] | None = None
        self._prompt_missing = 0
        self._prompt_sent = False
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_ids)
            self._prompt_missing = len(self.prompt_ids) - 1

    def add_prompt_logprobs(self, first_position: int, entries: list[PromptLogprob]) -> bool:
        """A prefill chunk's prompt log-probs (positions from `first_position`); a position
        computed again (recompute after preemption) keeps its first value. True when every
        position has one."""
        assert self.prompt_logprobs is not None
        for position, entry in enumerate(entries, first_position):
            if self.prompt_logprobs[position] is None:
                self.prompt_logprobs[position] = entry
                self._prompt_missing -= 1
        return self._prompt_missing == 0

    def take_prompt_logprobs(self) -> list[PromptLogprob | None] | None:
        """The prompt log-probs for the request's first output (None afterwards)."""
        if self.prompt_logprobs is None or self._prompt_sent:
            return None
        self._prompt_sent = True
        return self.prompt_logprobs

    def check(self, token_ids: Sequence[int]) -> FinishReason | None:
        """generate's stopping criteria on the whole sequence (prompt + output)."""
        return self.checker.check(token_ids)

    def sequence_text(self, context_ids: Sequence[int] | None = None) -> SequenceText:
        return SequenceText(
            self.tokenizer,
            self.prompt_ids if context_ids is None else context_ids,
            self.cut_strings,
            self.params.skip_special_tokens,
        )

    def token_output(
        self,
        index: int,
        text: SequenceText,
        token: GeneratedToken,
        reason: FinishReason | None,
        num_output_tokens: int,
    ) -> SequenceOutput:
        """One new token of sequence `index`, as the client sees it."""
        token.text = text.add(token.id, reason)
        if not self.params.logprobs:
            token.logprob = None
        return SequenceOutput(index, token.text, [token], num_output_tokens, reason)

    def whole_sequence(self, index: int, row: Sequence[int], score: float) -> SequenceOutput:
        """A finished sequence delivered at once (a beam result): cut where the stop checks
        end it, its text whole (stop strings cut) and shared among its tokens."""
        tokens: list[int] = []
        reason = None
        for token in row:
            tokens.append(token)
            reason = self.check(self.prompt_ids + tokens)
            if reason is not None:
                break
        reason = reason or FinishReason.LENGTH
        decode = self._decode
        text = StopStringTextFilter(self.cut_strings).finish(decode(tokens), reason)
        pieces = split_text(text, tokens, decode)
        generated = [GeneratedToken(t, text=piece) for t, piece in zip(tokens, pieces, strict=True)]
        return SequenceOutput(index, text, generated, len(tokens), reason, score=score)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens))


def chosen_token(logprobs: torch.Tensor, token: int, n: int) -> GeneratedToken:
    """A token chosen from a [vocab] log-prob row, with its `n` most likely alternatives,
    best first (-inf ones dropped)."""
    top: list[tuple[int, float]] = []
    if n > 0:
        values, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(ids, values, strict=True) if v != -float("inf")]
    return GeneratedToken(token, float(logprobs[token]), top)


def split_text(text: str, token_ids: list[int], decode: Callable[[list[int]], str]) -> list[str]:
    """Share a multi-token text among its tokens: each token gets what it completes, never a
    broken character; the pieces always concatenate to `text` (the rest goes to the last)."""
    if not token_ids:
        return []
    pieces: list[str] = []
    emitted = ""
    for k in range(len(token_ids) - 1):
        prefix = decode(token_ids[: k + 1])
        piece = ""
        if not prefix.endswith("\ufffd") and prefix.startswith(emitted):
            candidate = prefix[len(emitted) :]
            if text.startswith(emitted + candidate):
                piece = candidate
        pieces.append(piece)
        emitted += piece
    pieces.append(text[len(emitted) :])
    return pieces
