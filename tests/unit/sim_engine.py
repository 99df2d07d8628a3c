"""A pure-Python stand-in for the model, to drive the scheduler in tests.

Every KV slot records the digest of the token prefix it was computed from; each step
checks that the slots a sequence attends to hold exactly its own prefix (so prefix
caching, copy on write and preemption can never hand a sequence someone else's KV), and
the "model" picks the next token as a function of that prefix alone.
"""

from __future__ import annotations

import hashlib

from app.engine.core.kv_cache_manager import KVCacheManager
from app.engine.core.request import FinishReason, Request, Sequence
from app.engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

VOCAB = 50


def prefix_digest(tokens: list[int]) -> bytes:
    return hashlib.blake2b(repr(tokens).encode(), digest_size=8).digest()


def next_token(tokens: list[int]) -> int:
    return prefix_digest(tokens)[0] % VOCAB


class SimEngine:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 32,
        prefix_caching: bool = True,
    ) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), self.kv)
        self.slots: dict[int, bytes] = {}
        self.max_new: dict[str, int] = {}
        self.finished: dict[str, list[list[int]]] = {}
        self.steps = 0

    def add(
        self, request_id: str, prompt: list[int], max_new: int, n: int = 1, model: int = 0
    ) -> Request:
        seqs = [Sequence.from_prompt(prompt)]
        request = Request(request_id, seqs, len(prompt) + max_new, max_num_seqs=n, model=model)
        self.max_new[request_id] = max_new
        self.scheduler.add_request(request)
        request.params = n  # forks wanted after prefill
        return request

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        bs = self.kv.block_size
        for src, dst in out.cow_copies:
            for off in range(bs):
                if src * bs + off in self.slots:
                    self.slots[dst * bs + off] = self.slots[src * bs + off]
        sampled: dict[int, int] = {}
        for item in out.seqs:
            request = self.scheduler.requests[item.request_id]
            seq = next(s for s in request.seqs if s.seq_id == item.seq_id)
            end = item.start_pos + len(item.token_ids)
            assert item.token_ids == seq.token_ids[item.start_pos : end]
            assert len(item.block_table) * bs >= end
            for pos in range(item.start_pos, end):
                slot = item.block_table[pos // bs] * bs + pos % bs
                self.slots[slot] = prefix_digest(seq.token_ids[: pos + 1])
            for pos in range(end):  # attention reads the whole context
                slot = item.block_table[pos // bs] * bs + pos % bs
                assert self.slots.get(slot) == prefix_digest(seq.token_ids[: pos + 1]), (
                    f"seq {seq.seq_id} reads wrong KV at position {pos}"
                )
            if item.sample:
                sampled[seq.seq_id] = next_token(seq.token_ids[:end])
        self.scheduler.update_from_output(out)
        for request in list(self.scheduler.running):
            live = request.live_seqs
            if not live or live[0].seq_id not in sampled:
                continue
            for seq in live:
                seq.token_ids.append(sampled[seq.seq_id])
            if request.params > 1 and len(request.seqs) == 1:
                for _ in range(request.params - 1):
                    child = live[0].fork()
                    child.token_ids[-1] = (child.token_ids[-1] + len(request.seqs)) % VOCAB
                    request.seqs.append(child)
                    self.scheduler.fork_sequence(live[0], child)
            if live[0].num_output_tokens >= self.max_new[request.request_id]:
                self.finished[request.request_id] = [s.output_token_ids for s in request.seqs]
                self.scheduler.finish_request(request.request_id, FinishReason.LENGTH)
        self.steps += 1
        return out

    def run(self, max_steps: int = 10_000) -> None:
        while self.scheduler.has_unfinished():
            self.step()
            assert self.steps < max_steps, "scheduler made no progress"
            self.kv.check_integrity()
