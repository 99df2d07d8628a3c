"""Async scheduling (`--async-scheduling`): step k+1 is scheduled while step k runs.

As vLLM v1's async scheduler: the engine schedules step k+1 assuming every sequence that
samples at step k gets exactly one token there (a placeholder id stands in the sequence's
token list), and the worker thread that runs the steps' forwards and sampler calls, in
order, puts step k's sampled token in place of the placeholder before step k+1's forward.
Meanwhile the engine thread takes step k's tokens (read back on the worker) and processes
them (stop checks, text, delivery). A sequence that finished at step k had its placeholder
computed at step k+1: that row is not sampled, its output never emitted, its blocks freed
(never hashed into the prefix cache). The engine falls back to its synchronous step, after
draining the step in flight, whenever a request is not `overlappable`.

Here: the setting, the eligibility rule, the worker (one thread, FIFO jobs) and
`OverlappedSteps`, the overlapped step itself, which sees the engine through an
`OverlapContext` (its scheduler, request states, sampler, forward and output path), as the
speculative decoder sees it through a SpecContext.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch

from app.engine.core.request import Sequence
from app.engine.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from app.engine.model_runner import StepResult
from app.engine.outputs import GeneratedToken, RequestOutput
from app.engine.request_state import RequestState
from app.engine.sample.group_sampling import sample_built
from app.engine.sample.row import SamplingRow
from app.engine.sample.sampler import Sampler
from app.engine.step_timing import StepTimer
from app.options.params import SamplingParams

logger = logging.getLogger("kogpt.engine")

AsyncScheduling = Literal["auto", "on", "off"]

# Stands in a sequence's token list for the token its in-flight step is sampling.
PLACEHOLDER_TOKEN = -1


def resolve_async_scheduling(setting: AsyncScheduling, device_type: str) -> bool:
    """`auto`: on for CUDA, where the host work between forwards leaves the device idle;
    off on CPU, where the forward and the host work share the same cores (measured with
    tests/benchmarks/async_scheduling.py: no gain on the 2-core CPU)."""
    if setting == "auto":
        return device_type == "cuda"
    return setting == "on"


def overlappable(params: SamplingParams, prompt_len: int) -> bool:
    """A request whose steps may overlap: one sequence, greedy or temperature / top-k /
    top-p sampling (seeded or not), nothing on the host reading its token history at
    sampling time (logits processors, min-length bans, grammar or allowed tokens), no
    beams, no n > 1 forks, no drafts, no guidance companion, no prompt log-probs."""
    return (
        params.num_beams == 1
        and params.num_return_sequences == 1
        and params.max_new_tokens != 0
        and not params.has_logits_options
        and params.min_total_length(prompt_len) <= prompt_len
        and params.guidance_scale is None
        and params.grammar is None
        and params.allowed_token_ids is None
        and params.prompt_logprobs is None
        and params.prompt_lookup_num_tokens is None
    )


def step_worker(initializer: Callable[[], None] | None = None) -> ThreadPoolExecutor:
    """The thread that runs the overlapped steps' jobs (forwards, sampler calls) in the order
    they are submitted, as one CUDA stream would. One worker of an executor: FIFO, and at
    interpreter exit the jobs in flight finish before the thread is joined (a daemon thread
    killed inside torch's C++ code aborts the process). `initializer` runs on the thread
    first (the engine makes the model's CUDA device current there: it is per thread)."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="kogpt-step", initializer=initializer
    )


# One overlapped step's sampler call, on the worker: (state, sequences, picks) per request,
# the requests whose sampling failed, the requests whose forward failed, and the sampled
# token of each sequence (the next step's forward reads them in place of its placeholders).
Sampled = tuple[
    list[tuple[RequestState, list[Sequence], list[GeneratedToken]]],
    dict[str, Exception],
    dict[str, Exception],
    dict[int, int],
]
Forwarded = tuple[StepResult, dict[str, Exception]]  # the logits, the requests that broke


@dataclass
class InFlight:
    """An overlapped step launched on the worker and not yet read back."""

    sched: SchedulerOutput
    sampled: Future[Sampled]


@dataclass
class OverlapContext:
    """What the overlapped steps use of the engine."""

    scheduler: Scheduler
    states: dict[str, RequestState]
    sampler: Sampler
    step_timer: StepTimer
    device: torch.device
    forward: Callable[[SchedulerOutput], StepResult]
    forward_isolated: Callable[[SchedulerOutput, list[ScheduledSeq]], Forwarded]
    advance: Callable[[RequestState, Sequence, GeneratedToken, dict[str, RequestOutput]], None]
    fail: Callable[[dict[str, Exception]], list[RequestOutput]]


@dataclass
class OverlappedSteps:
    """The engine's overlapped steps: at most one in flight on the worker."""

    ctx: OverlapContext
    num_steps: int = 0
    _worker: ThreadPoolExecutor | None = None
    _inflight: InFlight | None = None
    # Requests that need the synchronous step (not `overlappable`; pruned as they end).
    _sync_only: set[str] = field(default_factory=set)

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None

    def admit(self, request_id: str, params: SamplingParams, prompt_len: int) -> None:
        if not overlappable(params, prompt_len):
            self._sync_only.add(request_id)

    def allowed(self) -> bool:
        """Every request of the batched lane is overlappable (the engine also checks that
        no exclusive lane or draft model runs)."""
        self._sync_only.intersection_update(self.ctx.states)
        return not self._sync_only

    def step(self, sched: SchedulerOutput) -> list[RequestOutput]:
        """Launch step k+1 (`sched`: its forward on the worker, after step k's sampler
        call), then read back and process step k, then plan step k+1's sampler call."""
        previous = self._inflight
        if self._worker is None:
            self._worker = step_worker(self._worker_device)
        prior = None if previous is None else previous.sampled
        forward = self._worker.submit(self._forward, sched, prior)
        self._inflight = None
        outputs = self._collect(previous) if previous is not None else []
        self._inflight = self._plan_sampling(sched, forward)
        self.num_steps += 1
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Read back and process the step in flight (nothing runs on the worker after)."""
        flight, self._inflight = self._inflight, None
        return [] if flight is None else self._collect(flight)

    def _worker_device(self) -> None:
        """On the step worker, first: CUDA's current device is per thread, and graph
        replays, events and kernels launch on the current one (the model's, cuda:N)."""
        if self.ctx.device.type == "cuda":
            torch.cuda.set_device(self.ctx.device)

    def _forward(self, sched: SchedulerOutput, prior: Future[Sampled] | None) -> Forwarded:
        """On the worker: the previous step's tokens in place of the placeholders (its
        sampler call ran just before, on this thread), then the forward; a failing batch is
        retried one request at a time, as the synchronous step does."""
        self.ctx.step_timer.begin_step(continuing=prior is not None)
        tokens = prior.result()[3] if prior is not None else {}
        for item in sched.seqs:
            if item.token_ids and item.token_ids[-1] == PLACEHOLDER_TOKEN:
                # No token: its request's sampling failed (it fails on the engine thread) or
                # it finished; 0 is computed and discarded.
                item.token_ids[-1] = tokens.get(item.seq_id, 0)
        try:
            return self.ctx.forward(sched), {}
        except Exception:
            logger.exception("batched forward failed: retrying its requests one at a time")
            sampling = [item for item in sched.seqs if item.sample]
            return self.ctx.forward_isolated(sched, sampling)

    def _plan_sampling(self, sched: SchedulerOutput, forward: Future[Forwarded]) -> InFlight:
        """On the engine thread, once the previous step is processed: the sampler rows of
        the step's sampling sequences that are still live (a sequence that finished at the
        previous step is not sampled: its extra token is discarded), the sampler call queued
        on the worker, the counts advanced and one placeholder per sampled sequence."""
        built: list[tuple[RequestState, list[Sequence], list[SamplingRow]]] = []
        planned: list[Sequence] = []
        for item in sched.seqs:
            state = self.ctx.states.get(item.request_id) if item.sample else None
            if state is None:
                continue
            seq = state.request.seqs[0]  # overlappable requests have one sequence
            if seq.seq_id != item.seq_id or seq.is_finished:
                continue
            row = SamplingRow.from_params(
                state.params, seq.token_ids, seq.prompt_len, state.generator
            )
            built.append((state, [seq], [row]))
            planned.append(seq)
        assert self._worker is not None
        sampled = self._worker.submit(self._sample, sched, forward, built)
        self.ctx.scheduler.update_from_output(sched, cache_blocks=False)
        for seq in planned:
            seq.token_ids.append(PLACEHOLDER_TOKEN)
        return InFlight(sched, sampled)

    def _sample(
        self,
        sched: SchedulerOutput,
        forward: Future[Forwarded],
        built: list[tuple[RequestState, list[Sequence], list[SamplingRow]]],
    ) -> Sampled:
        """On the worker, after the step's forward: one batched sampler call over the planned
        rows (the logits rows of requests whose forward failed are absent)."""
        result, broken = forward.result()
        kept = [i for i in sched.seqs if i.sample and i.request_id not in broken]
        row_of = {item.seq_id: row for row, item in enumerate(kept)}
        chunk = [
            (state, seqs, rows, [row_of[s.seq_id] for s in seqs])
            for state, seqs, rows in built
            if state.request.request_id not in broken
        ]
        failed: dict[str, Exception] = {}
        picks = sample_built(self.ctx.sampler, result.logits, chunk, failed)
        tokens = {
            seq.seq_id: pick.id
            for _state, seqs, chosen in picks
            for seq, pick in zip(seqs, chosen, strict=True)
        }
        return picks, failed, broken, tokens

    def _collect(self, flight: InFlight) -> list[RequestOutput]:
        """On the engine thread: wait for the step's tokens, then the synchronous step's
        output path (stop checks, text, finish), each placeholder replaced by its token."""
        picks, failed, broken, _tokens = flight.sampled.result()
        failed = dict(failed)
        self.ctx.scheduler.cache_computed(flight.sched, frozenset(broken))
        failures = self.ctx.fail(broken)
        outputs: dict[str, RequestOutput] = {}
        for state, seqs, chosen in picks:
            request_id = state.request.request_id
            if self.ctx.states.get(request_id) is not state or request_id in failed:
                continue  # aborted (or failed) while the step ran
            try:
                for seq, pick in zip(seqs, chosen, strict=True):
                    if seq.token_ids[-1] != PLACEHOLDER_TOKEN:
                        raise RuntimeError(f"sequence {seq.seq_id} has no token in flight")
                    seq.token_ids.pop()
                    self.ctx.advance(state, seq, pick, outputs)
            except Exception as err:
                logger.exception("request %s failed", request_id)
                failed[request_id] = err
        return list(outputs.values()) + failures + (self.ctx.fail(failed) if failed else [])
