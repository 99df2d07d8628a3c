"""The constrained rows' token masks applied to the scores (the torch side of grammar.py).

transformers builds `PrefixConstrainedLogitsProcessor` right after the min-length processors
and before forced_bos / forced_eos, suppression and the warpers; `apply_constraints` runs at
that place (logits_processors.apply_processors) with the same arithmetic:
`scores + mask`, where mask is 0 at an allowed token and -inf elsewhere. So top-k, top-p and
temperature then work on the allowed tokens only, as with prefix_allowed_tokens_fn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from app.engine.grammar import GrammarError, TokenConstraint, token_masks

if TYPE_CHECKING:
    from app.engine.sample.row import SamplingRow


def apply_constraints(
    scores: torch.Tensor, rows: Sequence[SamplingRow], touched: list[bool]
) -> None:
    """In place on the [S, V] float32 scores, for the rows that carry a constraint."""
    members = [i for i, row in enumerate(rows) if row.constraint is not None]
    if not members:
        return
    constraints: list[TokenConstraint] = [rows[i].constraint for i in members]  # type: ignore[misc]
    allowed = torch.from_numpy(token_masks(constraints, scores.shape[-1]))
    idx = torch.tensor(members, device=scores.device)
    mask = torch.zeros(allowed.shape, dtype=scores.dtype)
    mask.masked_fill_(~allowed, float("-inf"))
    constrained = scores[idx] + mask.to(scores.device)
    scores[idx] = constrained
    for i in members:
        touched[i] = True
    stuck = (constrained == float("-inf")).all(dim=-1)
    if bool(stuck.any()):
        row = members[int(torch.nonzero(stuck)[0, 0])]
        raise GrammarError(
            f"no token is left for row {row}: the grammar / allowed_token_ids and the other "
            "options (bad words, repetition penalty, min length) exclude every token"
        )
