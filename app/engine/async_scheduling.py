"""Async scheduling (`--async-scheduling`): step k+1 is scheduled and prepared while step k runs.

As vLLM v1's async scheduler: the engine schedules step k+1 assuming every sequence that
samples at step k gets exactly one token there (a placeholder id stands in the sequence's
token list), and queues step k+1 (its forward, then its sampler call) on the worker thread
that runs the steps in order, before it reads back and processes step k (stop checks, text,
delivery) on its own thread.

The tokens never wait on the host between steps: step k's sampler call leaves them on the
device (`Sampler.launch`) and starts their copy back; step k+1's input ids take them there
(each placeholder becomes `handed_off_id(j)`, which ModelRunner.execute_step resolves on the
device, as vLLM scatters its sampled ids into the next input ids). So on CUDA the worker
queues step k+1's forward and sampling while the device still runs step k, and the device
runs step k+1 while the engine thread processes step k and schedules step k+2.

A sequence whose token in flight is its last by length is not scheduled again (as in vLLM).
One that finishes at step k on eos or a stop string is known only after step k+1 was queued:
its extra token is computed and sampled at step k+1 and discarded (never emitted, its blocks
freed, never hashed into the prefix cache); that row draws from its generator, so the
unseeded rows after it (one shared generator, in row order) draw other numbers than the
synchronous engine's. Greedy and seeded outputs are the synchronous engine's exactly. The
engine falls back to its synchronous step, after draining the step in flight, whenever a
request is not `overlappable`.

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
from typing import Any, Literal

import torch

from app.engine.core.request import Sequence
from app.engine.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from app.engine.model_runner import StepResult, handed_off_id
from app.engine.outputs import GeneratedToken, RequestOutput
from app.engine.request_state import RequestState
from app.engine.sample.group_sampling import generated_tokens, launch_chunk, sample_built
from app.engine.sample.row import SamplingRow
from app.engine.sample.sampler import SampleLaunch, Sampler
from app.engine.sample.seeded_draw import multinomial_error
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


Forwarded = tuple[StepResult, dict[str, Exception]]  # the logits, the requests that broke


# One sampler row of an overlapped step, planned on the engine thread in the step's order of
# sampling sequences: its request and sequence, or (None, None) for a row computed and
# discarded (greedy: it draws nothing from a generator).
Planned = tuple[RequestState | None, Sequence | None, SamplingRow]


def discarded_row() -> SamplingRow:
    """The row of a sequence with nothing to sample (an aborted request's): greedy, no
    log-prob, computed and discarded."""
    return SamplingRow(token_ids=(), logprob=False)


@dataclass
class Handoff:
    """A step's sampled tokens, still on the device, for the next step's input ids: sequence
    id -> its token's index in `tokens` (ModelRunner.execute_step's `handed_off`)."""

    tokens: torch.Tensor
    index: dict[int, int]


@dataclass
class Launched:
    """One overlapped step as the worker queued it: the requests whose forward failed, the
    planned rows it sampled (their logits rows present), and their sampler call: launched,
    its results on their way back (`launch`), or, when the batched launch raised, run one
    request at a time to the end (`picks`, `failed`)."""

    broken: dict[str, Exception]
    sampled: list[Planned]
    launch: SampleLaunch | None = None
    picks: list[tuple[RequestState, list[Sequence], list[GeneratedToken]]] = field(
        default_factory=list
    )
    failed: dict[str, Exception] = field(default_factory=dict)
    handoff: Handoff | None = None


@dataclass
class InFlight:
    """An overlapped step queued on the worker and not yet read back."""

    sched: SchedulerOutput
    launched: Future[Launched]


@dataclass
class OverlapContext:
    """What the overlapped steps use of the engine."""

    scheduler: Scheduler
    states: dict[str, RequestState]
    sampler: Sampler
    step_timer: StepTimer
    device: torch.device
    forward: Callable[[SchedulerOutput, torch.Tensor | None], StepResult]
    forward_isolated: Callable[
        [SchedulerOutput, list[ScheduledSeq], torch.Tensor | None], Forwarded
    ]
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
        """Queue step k+1 (`sched`: its forward and its sampler call) on the worker, then
        read back and process step k, then advance the scheduler past step k+1."""
        previous = self._inflight
        if self._worker is None:
            self._worker = step_worker(self._worker_device)
        planned = self._plan(sched)
        prior = None if previous is None else previous.launched
        launched = self._worker.submit(self._launch, sched, prior, planned)
        self._inflight = InFlight(sched, launched)
        outputs = self._collect(previous) if previous is not None else []
        self.ctx.scheduler.update_from_output(sched, cache_blocks=False)
        for state, seq, _row in planned:
            # A placeholder per sequence still running (one that finished at step k had
            # its extra token computed: it is discarded).
            if seq is not None and not seq.is_finished and self._live(state):
                seq.token_ids.append(PLACEHOLDER_TOKEN)
        self.num_steps += 1
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Read back and process the step in flight (nothing runs on the worker after)."""
        flight, self._inflight = self._inflight, None
        return [] if flight is None else self._collect(flight)

    def _live(self, state: RequestState | None) -> bool:
        return state is not None and self.ctx.states.get(state.request.request_id) is state

    def _worker_device(self) -> None:
        """On the step worker, first: CUDA's current device is per thread, and graph
        replays, events and kernels launch on the current one (the model's, cuda:N)."""
        if self.ctx.device.type == "cuda":
            torch.cuda.set_device(self.ctx.device)

    def _plan(self, sched: SchedulerOutput) -> list[Planned]:
        """On the engine thread, before step k is processed: one sampler row per sampling
        sequence of step k+1; a request already gone gets a discarded greedy row, which
        draws nothing. (A sequence whose token in flight reaches its length is not
        scheduled at all: Scheduler._last_token_in_flight.) One that finishes at step k on
        eos or a stop string cannot be known yet: its row draws, and is discarded."""
        planned: list[Planned] = []
        for item in sched.seqs:
            if not item.sample:
                continue
            state = self.ctx.states.get(item.request_id)
            seq = state.request.seqs[0] if state is not None else None  # one sequence
            if state is None or seq is None or seq.seq_id != item.seq_id or seq.is_finished:
                planned.append((None, None, discarded_row()))
                continue
            row = SamplingRow.from_params(
                state.params, seq.token_ids, seq.prompt_len, state.generator
            )
            planned.append((state, seq, row))
        return planned

    def _launch(
        self, sched: SchedulerOutput, prior: Future[Launched] | None, planned: list[Planned]
    ) -> Launched:
        """On the worker: step k+1's forward, with step k's tokens taken on the device
        (each placeholder becomes the id that stands for its sequence's token there), then
        its sampler call, launched: neither waits for the device, so the worker queues
        step k+1 while step k still runs. A failing batch is retried one request at a
        time, as the synchronous step does."""
        self.ctx.step_timer.begin_step(continuing=prior is not None)
        handoff = prior.result().handoff if prior is not None else None
        index = {} if handoff is None else handoff.index
        marked = False
        for item in sched.seqs:
            if item.token_ids and item.token_ids[-1] == PLACEHOLDER_TOKEN:
                at = index.get(item.seq_id)
                # No token: its request's sampling failed (it fails on the engine thread)
                # or it finished; 0 is computed and discarded.
                item.token_ids[-1] = 0 if at is None else handed_off_id(at)
                marked = marked or at is not None
        handed_off = handoff.tokens if marked and handoff is not None else None
        sampling = [item for item in sched.seqs if item.sample]
        try:
            result, broken = self.ctx.forward(sched, handed_off), {}
        except Exception:
            logger.exception("batched forward failed: retrying its requests one at a time")
            result, broken = self.ctx.forward_isolated(sched, sampling, handed_off)
        # The logits rows are the sampling sequences' whose forward ran, in step order.
        sampled = [
            plan
            for plan, item in zip(planned, sampling, strict=True)
            if item.request_id not in broken
        ]
        chunk = [(state, [seq], [row], [j]) for j, (state, seq, row) in enumerate(sampled)]
        launched = Launched(broken, sampled)
        if chunk:
            self._sample(result.logits, chunk, launched)
        return launched

    def _sample(
        self, logits: torch.Tensor, chunk: list[tuple[Any, ...]], launched: Launched
    ) -> None:
        """The step's one sampler call, launched: its tokens are the next step's hand-off.
        If the batched launch raises, the synchronous step's isolation (`sample_built`)
        samples to the end; the tokens go to the device then."""
        try:
            launch = launch_chunk(self.ctx.sampler, logits, chunk)
        except Exception:
            logger.exception("batched sampler call failed: sampling its requests one by one")
        else:
            position = launch.position
            launched.launch = launch
            launched.handoff = Handoff(
                launch.tokens,
                {
                    seq.seq_id: position[j]
                    for j, (_s, seq, _r) in enumerate(launched.sampled)
                    if seq is not None
                },
            )
            return
        live = [one for one in chunk if one[0] is not None]  # discarded rows: nothing to draw
        launched.picks = sample_built(self.ctx.sampler, logits, live, launched.failed)
        ids = {seqs[0].seq_id: chosen[0].id for _state, seqs, chosen in launched.picks if seqs}
        tokens = torch.tensor(list(ids.values()), dtype=torch.long, device=logits.device)
        launched.handoff = Handoff(tokens, {seq_id: j for j, seq_id in enumerate(ids)})

    def _collect(self, flight: InFlight) -> list[RequestOutput]:
        """On the engine thread: wait for the step's results, then the synchronous step's
        output path (stop checks, text, finish), each placeholder replaced by its token."""
        launched = flight.launched.result()
        self.ctx.scheduler.cache_computed(flight.sched, frozenset(launched.broken))
        failures = self.ctx.fail(launched.broken)
        failed = dict(launched.failed)
        picks = launched.picks
        if launched.launch is not None:
            out = launched.launch.finish()  # waits for the copy back
            tokens = generated_tokens(out)
            picks = []
            for j, (state, seq, _row) in enumerate(launched.sampled):
                if state is None or seq is None:
                    continue
                code = out.invalid.get(j)
                if code:  # multinomial refuses the row: its request fails alone
                    failed.setdefault(state.request.request_id, multinomial_error(code))
                    continue
                picks.append((state, [seq], [tokens[j]]))
        outputs: dict[str, RequestOutput] = {}
        for state, seqs, chosen in picks:
            request_id = state.request.request_id
            if not self._live(state) or request_id in failed:
                continue  # finished at the step before, aborted, or failed
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
