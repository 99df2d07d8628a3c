"""Speculative decoding: drafted tokens are verified in one forward; the output never changes.

A sequence with drafts `d_0 .. d_{D-1}` (prompt lookup, ngram_proposer.py) is scheduled with
its last token followed by the drafts, and the forward returns D + 1 logits rows for it.
Verification replays plain decoding over those rows, one token at a time: round 0 is the
ordinary sampler call of the step (the engine's own path); round j >= 1 runs only if the
token chosen in round j - 1 equals d_{j-1}, and chooses token j from row j with the same
sampler call plain decoding would make at that point: the same logits processors over the
same token ids (the accepted drafts are already appended), the same per-request generator
(one draw per token, in order), the same stop checks after every token. So greedy and seeded
sampling give exactly the tokens of plain decoding, and a draft is worth only the forward
it saves. The chosen token at the first mismatch (or after the last draft) is kept, as plain
decoding would have produced it; the rejected drafts' KV stays beyond num_computed_tokens
(Scheduler.accept_drafts).

Who speculates: one-sequence requests (no beams, no num_return_sequences > 1, no guidance
companion) with prompt_lookup_num_tokens, or, when the engine has a draft model
(draft_model.py), all the other one-sequence requests (num_assistant_tokens drafts, with
transformers' schedules). The others decode plainly (their output is the same either way).

Numerics: the verified rows come from one multi-token attention call instead of several
single-token ones, equal up to floating-point rounding (as the engine's batching already is).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from app.engine.core.request import Sequence
from app.engine.core.scheduler import ScheduledSeq, Scheduler
from app.engine.outputs import GeneratedToken, RequestOutput
from app.engine.request_state import RequestState
from app.engine.sample.group_sampling import sample_groups
from app.engine.sample.sampler import Sampler
from app.engine.spec.draft_model import DraftModel, DraftRequest
from app.engine.spec.ngram_proposer import propose_ngram
from app.options.speculative import DEFAULT_MAX_MATCHING_NGRAM_SIZE

# The engine's output callback: a chosen token -> the request's output (stop checks,
# detokenization), exactly as for a token of plain decoding.
Advance = Callable[[RequestState, Sequence, GeneratedToken, dict[str, RequestOutput]], None]


@dataclass
class SpecContext:
    """What verification and drafting use of the engine, handed in (never the engine)."""

    states: Mapping[str, RequestState]  # request id -> the engine's per-request state
    advance: Advance
    sampler: Sampler
    scheduler: Scheduler
    draft: DraftModel | None
    copy_blocks: Callable[[list[tuple[int, int]]], None]  # in every KV cache


def first_logits_rows(sampling: list[ScheduledSeq]) -> list[int]:
    """Each sampling item's first logits row (an item with drafts has 1 + len(drafts))."""
    rows, row = [], 0
    for item in sampling:
        rows.append(row)
        row += 1 + len(item.draft_token_ids)
    return rows


def can_speculate(state: RequestState) -> bool:
    """One sequence decoding plainly: the requests whose drafts can be verified token by token."""
    params, request = state.params, state.request
    return (
        state.beam is None
        and params.num_return_sequences == 1
        and params.guidance_scale is None
        and len(request.seqs) == 1
    )


@dataclass
class _Verifying:
    item: ScheduledSeq
    row: int  # logits row of round 0
    state: RequestState
    seq: Sequence
    accepted: int = 0


class SpecDecoder:
    """Proposes drafts after a step and verifies them in the next; counts both."""

    def __init__(self, ctx: SpecContext) -> None:
        self.ctx = ctx
        self.num_draft_tokens = 0  # drafts computed by the target model
        self.num_accepted_tokens = 0  # of which plain decoding chose the same token

    def verify(
        self,
        sampling: list[ScheduledSeq],
        logits: torch.Tensor,
        outputs: dict[str, RequestOutput],
        failed: dict[str, Exception],
    ) -> None:
        """Rounds 1.. of verification (round 0, the plain sampler call, already ran)."""
        active: list[_Verifying] = []
        for item, row in zip(sampling, first_logits_rows(sampling), strict=True):
            if not item.draft_token_ids:
                continue
            self.num_draft_tokens += len(item.draft_token_ids)
            state = self.ctx.states.get(item.request_id)
            if state is not None:
                active.append(_Verifying(item, row, state, state.request.seqs[0]))
        verifying = list(active)
        round_ = 0
        while active := [v for v in active if self._matches(v, round_, failed)]:
            round_ += 1
            for v in active:
                v.accepted += 1
            self._sample_round(active, round_, logits, outputs, failed)
        for v in verifying:
            self.num_accepted_tokens += v.accepted
            if v.item.request_id not in failed:
                self.ctx.scheduler.accept_drafts(v.item, v.accepted)
                _update_assistant_tokens(v)

    def _matches(self, v: _Verifying, round_: int, failed: dict[str, Exception]) -> bool:
        """Round `round_` chose draft `round_` and the sequence goes on: verify the next row."""
        request_id = v.item.request_id
        drafts = v.item.draft_token_ids
        if request_id in failed or request_id not in self.ctx.states or v.seq.is_finished:
            return False
        return round_ < len(drafts) and v.seq.token_ids[-1] == drafts[round_]

    def _sample_round(
        self,
        active: list[_Verifying],
        round_: int,
        logits: torch.Tensor,
        outputs: dict[str, RequestOutput],
        failed: dict[str, Exception],
    ) -> None:
        """One batched sampler call over row `round_` of every still-verifying sequence."""
        index = torch.tensor([v.row + round_ for v in active], device=logits.device)
        rows = logits.index_select(0, index)
        groups = [(v.state, {v.seq.seq_id: i}) for i, v in enumerate(active)]
        for state, seqs, picks in sample_groups(self.ctx.sampler, rows, groups, failed):
            try:
                for seq, pick in zip(seqs, picks, strict=True):
                    self.ctx.advance(state, seq, pick, outputs)
            except Exception as err:
                failed[state.request.request_id] = err

    def propose(self, sampling: list[ScheduledSeq]) -> None:
        """Drafts for the sequences that just got tokens, verified in the next step."""
        wanted: list[tuple[RequestState, Sequence, int]] = []  # state, sequence, drafts allowed
        for request_id in dict.fromkeys(item.request_id for item in sampling):
            state = self.ctx.states.get(request_id)
            if state is None or not can_speculate(state):
                continue
            seq = state.request.seqs[0]
            # The step verifies the drafts and adds the token after them: stay within the
            # request's length limit.
            room = state.params.stop_length(seq.prompt_len) - len(seq.token_ids) - 1
            if not seq.is_finished and room >= 1:
                wanted.append((state, seq, room))
        drafting: list[tuple[Sequence, DraftRequest]] = []
        for state, seq, room in wanted:
            params = state.params
            if params.prompt_lookup_num_tokens is not None:
                seq.spec_token_ids = propose_ngram(
                    seq.token_ids,
                    min(params.prompt_lookup_num_tokens, room),
                    params.max_matching_ngram_size or DEFAULT_MAX_MATCHING_NGRAM_SIZE,
                    params.stop_length(seq.prompt_len),
                    params.eos_token_ids,
                )
            elif self.ctx.draft is not None:
                scheduled = state.sequence(seq).assistant_tokens
                num = min(scheduled or params.num_assistant_tokens, room)
                if self._reserve(seq, len(seq.token_ids) + num):
                    request = DraftRequest(
                        seq.token_ids,
                        self.ctx.scheduler.kv.block_table(seq.seq_id),
                        num,
                        params.eos_token_ids,
                        params.assistant_confidence_threshold,
                    )
                    drafting.append((seq, request))
        if drafting:
            assert self.ctx.draft is not None
            self.ctx.draft.propose([r for _, r in drafting])
            for seq, request in drafting:
                seq.spec_token_ids = request.drafts

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for the draft model's KV writes (and the next step's verification)."""
        copies = self.ctx.scheduler.reserve_slots(seq, num_tokens)
        if copies is None:
            return False
        if copies:  # both caches must copy before the draft writes into the new blocks
            self.ctx.copy_blocks(copies)
        return True


def _update_assistant_tokens(v: _Verifying) -> None:
    """transformers' heuristic schedules: 2 more drafts after a fully accepted round, else
    one fewer (at least 1); per request, so "heuristic_transient" is the same here."""
    params = v.state.params
    if params.prompt_lookup_num_tokens is not None or params.num_assistant_tokens_schedule not in (
        "heuristic",
        "heuristic_transient",
    ):
        return
    seq_state = v.state.sequence(v.seq)
    num = seq_state.assistant_tokens or params.num_assistant_tokens
    full = v.accepted == len(v.item.draft_token_ids)
    seq_state.assistant_tokens = num + 2 if full else max(1, num - 1)
