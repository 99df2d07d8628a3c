"""SimEngine with speculative decoding: drafts verified token by token, as the engine does.

The "model" and the KV-slot check are SimEngine's (every slot a sequence reads must hold the
digest of exactly its own prefix). A draft is the true continuation for its first `good`
tokens and wrong after that, `good` varying from step to step, so acceptance is partial,
full or none; the output must equal plain decoding's whatever the drafts were.
"""

from __future__ import annotations

from app.engine.core.request import FinishReason, Sequence
from app.engine.core.scheduler import SchedulerOutput
from tests.unit.sim_engine import VOCAB, SimEngine, next_token, prefix_digest


def draft_for(tokens: list[int], num: int, good: int) -> list[int]:
    """`num` tokens continuing `tokens`: right for the first `good`, wrong afterwards."""
    draft: list[int] = []
    context = list(tokens)
    for i in range(num):
        true = next_token(context)
        token = true if i < good else (true + 1) % VOCAB
        draft.append(token)
        context.append(token)
    return draft


class SpecSimEngine(SimEngine):
    def __init__(self, *args, num_drafts: int = 4, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.num_drafts = num_drafts
        self.drafted = 0
        self.accepted = 0

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        bs = self.kv.block_size
        for src, dst in out.cow_copies:
            for off in range(bs):
                if src * bs + off in self.slots:
                    self.slots[dst * bs + off] = self.slots[src * bs + off]
        verified: list[tuple[Sequence, list[int], int]] = []  # seq, drafts, first sampled
        for item in out.seqs:
            request = self.scheduler.requests[item.request_id]
            seq = next(s for s in request.seqs if s.seq_id == item.seq_id)
            context = seq.token_ids + item.draft_token_ids
            end = item.start_pos + len(item.token_ids)
            assert item.token_ids == context[item.start_pos : end]
            assert len(item.block_table) * bs >= end
            for pos in range(item.start_pos, end):
                slot = item.block_table[pos // bs] * bs + pos % bs
                self.slots[slot] = prefix_digest(context[: pos + 1])
            for pos in range(end):
                slot = item.block_table[pos // bs] * bs + pos % bs
                assert self.slots.get(slot) == prefix_digest(context[: pos + 1]), (
                    f"seq {seq.seq_id} reads wrong KV at position {pos}"
                )
            if item.sample:
                verified.append((seq, item.draft_token_ids, len(seq.token_ids)))
        self.scheduler.update_from_output(out)
        items = {item.seq_id: item for item in out.seqs}
        for seq, drafts, first in verified:
            request = self.scheduler.requests[items[seq.seq_id].request_id]
            accepted = 0
            for j in range(len(drafts) + 1):  # one token per logits row, as plain decoding
                token = next_token(seq.token_ids)
                seq.token_ids.append(token)
                if self._done(request, seq):
                    break
                if j == len(drafts) or token != drafts[j]:
                    break
                accepted += 1
            self.drafted += len(drafts)
            self.accepted += accepted
            if request.request_id in self.scheduler.requests:
                self.scheduler.accept_drafts(items[seq.seq_id], accepted)
                table = self.kv.block_table(seq.seq_id)
                assert len(table) <= self.kv.blocks_for_tokens(len(seq.token_ids))
                good = (len(seq.token_ids) * 7 + first) % (self.num_drafts + 2)
                remaining = len(seq.token_ids) - seq.prompt_len
                num = min(self.num_drafts, self.max_new[request.request_id] - remaining - 1)
                seq.spec_token_ids = draft_for(seq.token_ids, max(num, 0), good)
        self.steps += 1
        return out

    def _done(self, request, seq: Sequence) -> bool:  # type: ignore[no-untyped-def]
        if seq.num_output_tokens < self.max_new[request.request_id]:
            return False
        self.finished[request.request_id] = [seq.output_token_ids]
        self.scheduler.finish_request(request.request_id, FinishReason.LENGTH)
        return True
