"""Prompt-lookup drafts: transformers' PromptLookupCandidateGenerator over plain int lists.

The rules of `PromptLookupCandidateGenerator.get_candidates` (transformers 5.23): try n-gram
sizes from `max_matching_ngram_size` (capped at len - 1) down to 1; for each size, take the
sequence's last n tokens and scan every window of the sequence left to right (the first
match wins); the draft is what follows the match, at most `num_tokens` tokens and never past
the sequence's end or `max_length`; the first size with a non-empty continuation decides
(a later size is not tried even if the draft is cut to nothing by an eos); the draft is cut
before its first eos token.

Departure, with no effect on output (drafts are verified, so only the acceptance rate can
change): transformers also drops a candidate token that its logits processors would forbid
on constant logits; here forbidden tokens are simply rejected by verification.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def propose_ngram(
    token_ids: Sequence[int],
    num_tokens: int,
    max_ngram_size: int = 2,
    max_length: int | None = None,
    eos_token_ids: Collection[int] = (),
) -> list[int]:
    """Up to `num_tokens` draft tokens continuing `token_ids` (prompt + output so far)."""
    length = len(token_ids)
    end_cap = length if max_length is None else min(length, max_length)
    if num_tokens < 1 or (max_length is not None and max_length == length + 1):
        return []
    for size in range(min(max_ngram_size, length - 1), 0, -1):
        ngram = list(token_ids[length - size :])
        first = ngram[0]
        for idx in range(length - size + 1):
            if token_ids[idx] != first or list(token_ids[idx : idx + size]) != ngram:
                continue
            start = idx + size
            end = min(start + num_tokens, end_cap)
            if start < end:
                draft = list(token_ids[start:end])
                for i, token in enumerate(draft):
                    if token in eos_token_ids:
                        return draft[:i]
                return draft
    return []
