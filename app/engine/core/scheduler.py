"""Continuous-batching scheduler: token budget, chunked prefill, admission, preemption.

Pure Python. Each step it decides how many tokens of which sequences to compute; the
output is plain data (ids, counts, block ids) so the scheduler is tested with ints.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from app.engine.core.block_pool import KVBlock
from app.engine.core.kv_cache_manager import KVCacheManager
from app.engine.core.request import FinishReason, Request, RequestStatus, Sequence


@dataclass
class ScheduledSeq:
    seq_id: int
    request_id: str
    token_ids: list[int]  # the tokens computed this step
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: list[int]
    sample: bool  # this chunk ends at the sequence's last token: its logits are needed
    # Speculative tokens after the last token (the tail of token_ids): every token of the
    # chunk then needs its logits, and the engine verifies the drafts (spec/decoder.py).
    draft_token_ids: list[int] = field(default_factory=list)
    # Prompt log-probs (Request.prompt_logprobs): the prompt token that follows each of the
    # chunk's leading positions whose log-prob is wanted (empty: none), and how many top
    # alternatives each gets.
    prompt_targets: list[int] = field(default_factory=list)
    prompt_top_n: int = 0
    lora: Any = None  # the request's LoRA adapter (Request.lora); None: the base model
    model: int = 0  # the request's full model (Request.model)

    @property
    def all_logits(self) -> bool:
        return bool(self.draft_token_ids)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    cow_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048


class SchedulerCapacityError(ValueError):
    """The request can never fit the configured KV pool."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        if config.max_num_batched_tokens < 1 or config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self._waiting_models: Counter[int] = Counter()  # waiting requests per full model
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- bookkeeping ---------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def max_blocks_needed(self, request: Request) -> int:
        return request.max_num_seqs * self.kv.blocks_for_tokens(request.max_total_tokens)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        needed = self.max_blocks_needed(request)
        if needed > self.kv.num_blocks:
            raise SchedulerCapacityError(
                f"request needs up to {needed} KV blocks but the pool has {self.kv.num_blocks}"
            )
        if request.max_num_seqs > self.config.max_num_seqs:
            raise SchedulerCapacityError(
                f"request needs {request.max_num_seqs} sequences but max_num_seqs is "
                f"{self.config.max_num_seqs}"
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._waiting_models[request.model] += 1

    def finish_sequence(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        self.kv.free(seq.seq_id)

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish (or abort) a request wherever it is; frees all of its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self._unwait(request)
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = reason
            self.kv.free(seq.seq_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        return request

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, FinishReason.ABORT)

    def fork_sequence(self, parent: Sequence, child: Sequence) -> None:
        """Register `child` (a fork of `parent`) as sharing the parent's blocks."""
        self.kv.fork(parent.seq_id, child.seq_id)

    def replace_sequences(self, request: Request, new_seqs: list[Sequence]) -> None:
        """Beam reshuffle: `new_seqs` (kept or forked beforehand) replace the request's
        sequences; the blocks of sequences that are not carried on are freed."""
        keep = {s.seq_id for s in new_seqs}
        for seq in request.seqs:
            if seq.seq_id not in keep:
                self.kv.free(seq.seq_id)
        request.seqs = new_seqs

    # -- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        num_seqs = 0

        # Running requests in FCFS order. The preemption victim is the newest running
        # request, which comes after the current one, so it was not scheduled yet.
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            live = request.live_seqs
            if budget < len(live) or num_seqs + len(live) > self.config.max_num_seqs:
                continue
            if _last_token_in_flight(request, live):
                continue
            plan = self._plan_chunks(live, budget)
            if not any(plan):
                continue
            drafts = self._num_drafts(live, plan, budget)
            copies: list[tuple[int, int]] = []
            while not self._allocate(live, [plan[0] + drafts, *plan[1:]], copies):
                if drafts:  # short of blocks: decode without speculation before preempting
                    drafts = 0
                    continue
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            out.cow_copies.extend(copies)
            budget -= self._emit(request, live, plan, out, drafts)
            num_seqs += len(live)

        # Then waiting requests in FCFS order (with several models: the models in turn, see
        # _next_waiting) while budget, seats and blocks last.
        seats = Counter[int]()
        for running in self.running:
            seats[running.model] += len(running.live_seqs)
        while self.waiting and not out.preempted:
            request = self._next_waiting(seats)
            live = request.live_seqs
            if budget < len(live) or num_seqs + len(live) > self.config.max_num_seqs:
                break
            # Prompt log-probs need every prompt position's logits, which a cached block does
            # not have: such a request computes its prompt (bypass; its blocks are still
            # cached for others). Recomputing over adopted blocks costs the same forward
            # plus copy-on-write copies (docs/api.md, tests/benchmarks/prompt_logprobs.py).
            bypass = request.prompt_logprobs is not None
            hits = {
                s.seq_id: []
                if bypass
                else self.kv.find_cached_prefix(s.token_ids, request.cache_salt)
                for s in live
            }
            for seq in live:
                seq.num_computed_tokens = len(hits[seq.seq_id]) * self.kv.block_size
            plan = self._plan_chunks(live, budget)
            copies = []
            if not any(plan) or not self._allocate(live, plan, copies, hits):
                for seq in live:
                    seq.num_computed_tokens = 0
                break
            self._unwait(request)
            seats[request.model] += len(live)
            if request.num_preemptions == 0:
                request.num_cached_tokens = max(s.num_computed_tokens for s in live)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.cow_copies.extend(copies)
            budget -= self._emit(request, live, plan, out)
            num_seqs += len(live)
        return out

    def update_from_output(self, out: SchedulerOutput, cache_blocks: bool = True) -> None:
        """Advance `num_computed_tokens` by what the step computed; cache full blocks.

        `cache_blocks=False` (async scheduling: the step's forward is still running): the
        counts only; `cache_computed` hashes the blocks once the forward has run."""
        for item in out.seqs:
            request = self.requests.get(item.request_id)
            if request is None:
                continue  # finished or aborted while the step ran
            seq = next((s for s in request.seqs if s.seq_id == item.seq_id), None)
            if seq is None or seq.is_finished:
                continue
            # Drafts are computed but not yet accepted: accept_drafts counts the ones that are.
            num_new = len(item.token_ids) - len(item.draft_token_ids)
            seq.num_computed_tokens = item.start_pos + num_new
            if cache_blocks:
                self.kv.cache_full_blocks(
                    seq.seq_id, seq.token_ids, seq.num_computed_tokens, request.cache_salt
                )

    def cache_computed(self, out: SchedulerOutput, skip: frozenset[str] = frozenset()) -> None:
        """Async scheduling: step `out`'s forward has run, so the blocks it filled join the
        prefix cache (its counts were advanced at launch). Sequences finished, preempted or
        aborted since, and the requests in `skip` (their forward failed), are left out."""
        for item in out.seqs:
            request = self.requests.get(item.request_id)
            if (
                request is None
                or item.request_id in skip
                or request.status is not RequestStatus.RUNNING
            ):
                continue
            seq = self._live_seq(request, item.seq_id)
            if seq is None or not self.kv.has_seq(seq.seq_id):
                continue
            computed = item.start_pos + len(item.token_ids) - len(item.draft_token_ids)
            self.kv.cache_full_blocks(seq.seq_id, seq.token_ids, computed, request.cache_salt)

    def accept_drafts(self, item: ScheduledSeq, num_accepted: int) -> None:
        """After verification (the accepted drafts and the next token are in token_ids): the
        accepted drafts' KV is valid and counts as computed; the rejected ones' slots are
        garbage, left beyond num_computed_tokens (so never hashed into the prefix cache, and
        overwritten when those positions are computed), and blocks that only they used are
        freed."""
        request = self.requests.get(item.request_id)
        seq = None if request is None else self._live_seq(request, item.seq_id)
        if seq is None:
            return  # finished (blocks already freed) or aborted
        if not 0 <= num_accepted <= len(item.draft_token_ids):
            raise ValueError(f"{num_accepted} accepted of {len(item.draft_token_ids)} drafts")
        num_new = len(item.token_ids) - len(item.draft_token_ids)
        seq.num_computed_tokens = item.start_pos + num_new + num_accepted
        if seq.num_computed_tokens >= len(seq.token_ids):
            raise ValueError("accepted drafts must be followed by the token chosen after them")
        assert request is not None
        self.kv.cache_full_blocks(
            seq.seq_id, seq.token_ids, seq.num_computed_tokens, request.cache_salt
        )
        self.kv.trim(seq.seq_id, len(seq.token_ids))

    def reserve_slots(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]] | None:
        """Blocks for the running sequence's first `num_tokens` slots ahead of its next step
        (a draft model writes its drafts' KV there first). Returns the copy-on-write pairs
        to apply now, or None when the pool is short (then nothing changes)."""
        new = num_tokens - seq.num_computed_tokens
        if new < 1 or not self.kv.has_seq(seq.seq_id):
            return None
        return self.kv.allocate_slots(seq.seq_id, seq.num_computed_tokens, new)

    @staticmethod
    def _live_seq(request: Request, seq_id: int) -> Sequence | None:
        seq = next((s for s in request.seqs if s.seq_id == seq_id), None)
        return None if seq is None or seq.is_finished else seq

    # -- helpers -------------------------------------------------------------------------
    def _unwait(self, request: Request) -> None:
        if self.waiting and self.waiting[0] is request:
            self.waiting.popleft()
        else:
            self.waiting.remove(request)
        self._waiting_models[request.model] -= 1

    def _next_waiting(self, seats: Counter[int]) -> Request:
        """The waiting request to admit next. One model waiting (the usual case): the
        oldest. Several: the oldest of the models with the fewest running sequences, so a
        flood of requests for one model cannot keep another model's requests waiting (each
        model's own requests stay FCFS). A preempted request (at the front) goes first."""
        head = self.waiting[0]
        models = [m for m, n in self._waiting_models.items() if n > 0]
        if head.num_preemptions or len(models) < 2:
            return head
        fewest = min(seats[m] for m in models)
        return next(r for r in self.waiting if seats[r.model] == fewest)

    @staticmethod
    def _plan_chunks(live: list[Sequence], budget: int) -> list[int]:
        """Tokens per sequence this step; a request samples only when all its seqs finish.

        Sequences of one request advance in lockstep, so either every live sequence reaches
        its last token in this step (and the request samples), or none computes its last token.
        """
        remaining = [s.num_uncomputed for s in live]
        if sum(remaining) <= budget:
            return remaining
        share = budget // len(live)
        return [min(r - 1, share) for r in remaining]

    @staticmethod
    def _num_drafts(live: list[Sequence], plan: list[int], budget: int) -> int:
        """Drafts to verify after a one-sequence decode, within the token budget."""
        if len(live) != 1 or plan[0] != 1 or live[0].num_uncomputed != 1:
            return 0
        return min(len(live[0].spec_token_ids), budget - 1)

    def _allocate(
        self,
        live: list[Sequence],
        plan: list[int],
        copies: list[tuple[int, int]],
        hits: dict[int, list[KVBlock]] | None = None,
    ) -> bool:
        """Allocate blocks for the sequences of one request; False when the pool is short.

        Copy-on-write pairs are appended to `copies` as they happen, so a retry after a
        preemption keeps the copies that earlier sequences of the request already need.
        """
        needed = 0
        for seq, n in zip(live, plan, strict=True):
            table_len = len(self.kv.block_table(seq.seq_id)) + len(hits[seq.seq_id] if hits else ())
            needed += max(0, self.kv.blocks_for_tokens(seq.num_computed_tokens + n) - table_len)
        if needed > self.kv.num_free_blocks:
            return False
        if hits:  # adopt every prefix hit first: a fresh block for one sequence may evict
            # (reuse) a free cached block that a later sequence's hits still name
            for seq in live:
                cached = hits[seq.seq_id]
                if (
                    cached
                    and not self.kv.has_seq(seq.seq_id)
                    and (
                        self.kv.allocate_slots(seq.seq_id, seq.num_computed_tokens, 0, cached)
                        is None
                    )
                ):
                    for s in live:
                        self.kv.free(s.seq_id)
                    return False
        for seq, n in zip(live, plan, strict=True):
            if n == 0 and self.kv.has_seq(seq.seq_id):
                continue
            cached = hits[seq.seq_id] if hits and not self.kv.has_seq(seq.seq_id) else ()
            result = self.kv.allocate_slots(seq.seq_id, seq.num_computed_tokens, n, cached)
            if result is None:  # copy-on-write needed more than the estimate
                if hits:  # a new request: give back what its earlier sequences took
                    for s in live:
                        self.kv.free(s.seq_id)
                    copies.clear()
                return False
            copies.extend(result)
        return True

    def _emit(
        self,
        request: Request,
        live: list[Sequence],
        plan: list[int],
        out: SchedulerOutput,
        num_drafts: int = 0,
    ) -> int:
        samples = all(n == s.num_uncomputed for s, n in zip(live, plan, strict=True))
        used = 0
        for seq, n in zip(live, plan, strict=True):
            drafts = seq.spec_token_ids[:num_drafts] if num_drafts else []
            seq.spec_token_ids = []  # consumed (or dropped): the engine proposes afresh
            if n == 0:
                continue
            start = seq.num_computed_tokens
            targets: list[int] = []
            if request.prompt_logprobs is not None and seq is request.seqs[0]:
                # position p's logits give token p + 1's log-prob, for p + 1 in the prompt
                targets = seq.token_ids[start + 1 : min(start + n, seq.prompt_len - 1) + 1]
            out.seqs.append(
                ScheduledSeq(
                    seq_id=seq.seq_id,
                    request_id=request.request_id,
                    token_ids=seq.token_ids[start : start + n] + drafts,
                    start_pos=start,
                    block_table=self.kv.block_table(seq.seq_id),
                    sample=samples,
                    draft_token_ids=drafts,
                    prompt_targets=targets,
                    prompt_top_n=request.prompt_logprobs or 0,
                    lora=request.lora,
                    model=request.model,
                )
            )
            used += n + len(drafts)
        out.num_batched_tokens += used
        return used

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Recompute preemption: free the blocks, keep the tokens, requeue at the front."""
        self.running.remove(request)
        for seq in request.seqs:
            self.kv.free(seq.seq_id)
            seq.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._waiting_models[request.model] += 1
        out.preempted.append(request.request_id)


def _last_token_in_flight(request: Request, live: list[Sequence]) -> bool:
    """One sequence whose token list already reaches the request's length, its last token
    not computed: async scheduling's token in flight (the engine appended a placeholder for
    it), which the engine finishes on length when it reads the token back. No step is
    planned for it (vLLM's async scheduler skips the same requests): its forward would be
    discarded. The synchronous engine finishes such a sequence as its last token arrives,
    so it never gets here; requests of several sequences (beams, n > 1, a guidance
    companion) never overlap and are left alone."""
    if len(live) != 1:
        return False
    seq = live[0]
    return seq.num_computed_tokens >= seq.prompt_len and len(seq.token_ids) >= (
        request.max_total_tokens
    )
