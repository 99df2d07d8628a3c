"""LLMEngine: one synchronous step of continuous batching over the paged KV cache.

Each `step()` first advances every exclusive-lane run one step (class-B methods and the exact
lane run alone on transformers' model, lanes/), then asks the scheduler for work, runs one
varlen forward, samples one token for every sequence that reached its last token, and turns
each token into output through the one output path (output_processor.py: stop checks,
incremental detokenization, stop-string filter). It returns a `RequestOutput` per request that
produced something. The threaded asyncio front end lives in async_engine.py.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.async_scheduling import (
    AsyncScheduling,
    OverlapContext,
    OverlappedSteps,
    resolve_async_scheduling,
)
from app.engine.beam_search import BeamSearch, prepare_generation
from app.engine.core.kv_cache_manager import KVCacheManager
from app.engine.core.request import FinishReason, Request, Sequence
from app.engine.core.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from app.engine.grammar import ConstraintFactory
from app.engine.lanes.class_b.runner import ClassBRun, rows_error
from app.engine.lanes.context import LaneContext, LaneRequestError, LaneRun
from app.engine.lanes.exact import ExactRun
from app.engine.lora_registry import LoRARegistry, ServedLoRA
from app.engine.merged_models import MergedModels
from app.engine.model_runner import ModelRunner, StepResult, score_prompt_rows
from app.engine.output_processor import OutputProcessor
from app.engine.outputs import GeneratedToken, PromptLogprob, RequestOutput, SequenceOutput
from app.engine.request_state import RequestState, SequenceState
from app.engine.sample.group_sampling import sample_groups
from app.engine.sample.row import make_generator
from app.engine.sample.sampler import Sampler
from app.engine.spec.decoder import SpecContext, SpecDecoder, first_logits_rows
from app.engine.spec.draft_model import DraftModel
from app.engine.stop import token_bytes_table
from app.modeling.batch_invariant import BatchInvariant
from app.modeling.linear import LinearBackend, Quantize
from app.modeling.native import NativeKernels
from app.options.class_b import ClassBParams
from app.options.params import SamplingParams

logger = logging.getLogger("kogpt.engine")


@dataclass
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    seed: int = 0
    linear_backend: LinearBackend = "auto"  # app/modeling/linear.py
    quantize: Quantize = "none"  # "int8": dynamic int8 matmuls (float32 on CPU only)
    enforce_eager: bool = False  # never capture CUDA graphs of decode steps
    static_decode: bool | None = None  # padded decode: None = with graphs; True on CPU: tests
    native_kernels: NativeKernels = "auto"  # app/modeling/native.py
    batch_invariant: BatchInvariant = "auto"  # app/modeling/batch_invariant.py
    max_loras: int = 8  # LoRA adapters loaded at once (lora_registry.py)
    max_lora_rank: int = 64
    # Schedule step k+1 while step k runs (app/engine/async_scheduling.py); auto: CUDA.
    async_scheduling: AsyncScheduling = "auto"


class ModelNotServedError(LookupError):
    """A request names a full model this engine does not serve."""


@torch.inference_mode()
def model_prompt_logprobs(
    model: torch.nn.Module, prompt: list[int], top_n: int
) -> list[PromptLogprob | None]:
    """Prompt log-probs from transformers' model itself (the exclusive lanes' requests)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    hidden = model.transformer(ids).last_hidden_state[0]  # ln_f applied
    rows = list(range(len(prompt) - 1))
    vocab = int(model.config.vocab_size)
    scored = score_prompt_rows(model.lm_head, hidden, rows, prompt[1:], top_n, vocab)
    return [None, *scored]


@torch.inference_mode()
def heal_prompt(model: torch.nn.Module, tokenizer: Any, prompt_token_ids: list[int]) -> list[int]:
    """generate's token healing: the prompt's tail token is re-chosen among its
    extensions (transformers' own heal_tokens, a one-token generate on the prompt)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_token_ids], device=device)
    healed = model.heal_tokens(ids, tokenizer)[0]
    pad = tokenizer.pad_token_id
    return [int(t) for t in healed.tolist() if t != pad] or prompt_token_ids


class LLMEngine:
    def __init__(
        self,
        hf_model: torch.nn.Module,
        tokenizer: Any,
        config: EngineConfig,
        draft_model: torch.nn.Module | None = None,
        more_models: Mapping[str, torch.nn.Module] | None = None,
        model_name: str | None = None,
    ) -> None:
        """``more_models``: the server's other full models by name (fine-tunes of
        ``hf_model``'s base: same tokenizer, device and dtype), selected per request by
        ``params.model_name``; ``model_name``: ``hf_model``'s own (None or it: the default).
        """
        self.config = config
        self.tokenizer = tokenizer
        more = dict(more_models or {})
        # Model index by name: 0 is hf_model (the default), then more_models in order.
        self.model_names = [model_name or "", *more]
        self._model_index = {name: i for i, name in enumerate(self.model_names)}
        self.runner = ModelRunner(
            hf_model,
            config.num_blocks,
            config.block_size,
            config.linear_backend,
            quantize=config.quantize,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
            static_decode=config.static_decode,
            native_kernels=config.native_kernels,
            batch_invariant=config.batch_invariant,
            more_models=list(more.values()),
        )
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        # LoRA adapters requests may name (add_request's lora_name); loaded by the caller.
        # Prefix-cache namespaces (Request.cache_salt): 0 the default model, then one per
        # other full model and one per adapter load, never reused.
        salts = itertools.count(1)
        self._model_salts = [0, *(next(salts) for _ in more)]
        self.lora = LoRARegistry(
            [m.config for m in self.runner.hf_models],
            self.runner.device,
            self.runner.dtype,
            config.max_loras,
            config.max_lora_rank,
            salts=salts,
            model_names=self.model_names,
        )
        # Merged copies (base + adapter) for the requests of an adapter that run on
        # transformers' model (exclusive lanes, token healing); see _hf_model_for.
        self._merged = MergedModels(self.runner.hf_models)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.kv
        )
        self.sampler = Sampler(torch.Generator(device=self.runner.device).manual_seed(config.seed))
        self.draft = None  # a smaller GPT-2 drafting tokens (--draft-model), see draft_model.py
        if draft_model is not None:
            self.draft = DraftModel(
                draft_model,
                hf_model,
                config.num_blocks,
                config.block_size,
                native_kernels=config.native_kernels,
            )
        self._token_bytes: list[bytes] | None = None
        self.constraints = ConstraintFactory(tokenizer, int(hf_model.config.vocab_size))
        self._states: dict[str, RequestState] = {}
        # Exclusive lanes (class-B methods, the exact lane): one step each per engine step.
        self._lanes: dict[str, LaneRun] = {}
        self._lane_prompt_logprobs: dict[str, list[PromptLogprob | None]] = {}
        # Aborts signalled from other threads: a long lane step sees them between its chunks.
        self._cancelled: set[str] = set()
        self.lane_context = self._lane_context(hf_model)
        # speculative decoding: drafts and their verification, through a narrow context
        self.spec = SpecDecoder(
            SpecContext(
                self._states,
                self._advance,
                self.sampler,
                self.scheduler,
                self.draft,
                self._copy_blocks,
            )
        )
        self.num_steps = 0
        self._lanes_ended = 0.0  # when the last lane steps ended, and how long they took
        self._lanes_took = 0.0
        self.last_batch_size = 0
        # Async scheduling: the step in flight on the worker (one at most), and the requests
        # that need the synchronous step (not `overlappable`; pruned as they end).
        self.overlap: OverlappedSteps | None = None
        if resolve_async_scheduling(config.async_scheduling, self.runner.device.type):
            self.overlap = OverlappedSteps(
                OverlapContext(
                    self.scheduler,
                    self._states,
                    self.sampler,
                    self.runner.step_timer,
                    self.runner.device,
                    # Looked up at each call: tests spy on the engine's own methods.
                    forward=lambda sched, tokens: self._forward(sched, tokens),
                    forward_isolated=lambda sched, rows, tokens: self._forward_isolated(
                        sched, rows, tokens
                    ),
                    advance=lambda state, seq, pick, outs: self._advance(state, seq, pick, outs),
                    fail=lambda failed: self._fail(failed),
                )
            )
        # Called with the number of scheduled sequences after every non-empty step (metrics).
        self.step_observers: list[Callable[[int], None]] = []

    # -- requests ------------------------------------------------------------------------
    @property
    def token_bytes(self) -> list[bytes]:
        if self._token_bytes is None:  # built lazily: only stop strings need it
            self._token_bytes = token_bytes_table(self.tokenizer)
        return self._token_bytes

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        diagnostics: tuple[str, ...] = (),
    ) -> None:
        """Admit a request. `diagnostics` (output_attentions / output_hidden_states) and the
        class-B methods take an exclusive lane; everything else the batched one.
        `params.max_new_tokens == 0`: the prompt only (its log-probs), nothing sampled.
        `params.model_name`: the full model that runs it (None: the default).
        `params.lora_name`: a loaded LoRA adapter it runs with (on the adapter's model)."""
        class_b = isinstance(params, ClassBParams) and params.class_b is not None
        lora = None
        model = self.model_index(params.model_name)
        if params.lora_name is not None:
            lora = self.lora.get(params.lora_name)  # LoRANotFoundError: unloaded meanwhile
            model = lora.base
        lane_prompt = None
        if diagnostics or class_b or params.token_healing:
            # The exclusive lanes and token healing run transformers' model: the request's
            # own, or with an adapter a merged copy (built once per adapter, kept while used).
            context = self._lane_context(self._hf_model_for(model, lora))
        if params.prompt_logprobs is not None and (diagnostics or class_b):
            # The exclusive lanes run transformers' generate, not the paged prefill: their
            # prompt's log-probs come from one forward of the model here.
            top_n = params.prompt_logprobs
            lane_prompt = model_prompt_logprobs(context.model, list(prompt_token_ids), top_n)
        if diagnostics:
            run: LaneRun = ExactRun(context, list(prompt_token_ids), params, list(diagnostics))
            self._lanes[request_id] = run
            if lane_prompt is not None:
                self._lane_prompt_logprobs[request_id] = lane_prompt
            return
        if isinstance(params, ClassBParams) and params.class_b is not None:
            too_many = rows_error(params, self.config.max_num_seqs)
            if too_many is not None:  # as the scheduler refuses a request that can never fit
                raise LaneRequestError(too_many)
            cancelled = self._cancelled
            run = ClassBRun(
                context, list(prompt_token_ids), params, lambda: request_id in cancelled
            )
            self._lanes[request_id] = run
            if lane_prompt is not None:
                self._lane_prompt_logprobs[request_id] = lane_prompt
            return
        if params.token_healing:
            prompt_token_ids = context.heal(prompt_token_ids)
        prompt_len = len(prompt_token_ids)
        seq = Sequence.from_prompt(prompt_token_ids)
        seqs = [seq]
        max_total = params.stop_length(prompt_len)
        companion = None
        if params.guidance_scale is not None:
            # The unconditional sequence: the negative prompt (generate's default: the
            # prompt's last token), then every generated token; its logits guide the choice.
            negative = params.negative_prompt_ids or prompt_token_ids[-1:]
            companion = Sequence.from_prompt(negative)
            seqs.append(companion)
            max_total = max(max_total, len(negative) + max_total - prompt_len)
        request = Request(
            request_id,
            seqs,
            max_total_tokens=max_total,
            params=params,
            max_num_seqs=max(params.num_beams, params.num_return_sequences, len(seqs)),
        )
        if params.prompt_logprobs is not None and prompt_len > 1:
            request.prompt_logprobs = params.prompt_logprobs
        request.model, request.cache_salt = model, self._model_salts[model]
        if lora is not None:  # every sequence of the request (guidance's companion too)
            request.lora, request.cache_salt = lora.adapter, lora.cache_salt
        output = OutputProcessor(params, prompt_token_ids, self.tokenizer, lambda: self.token_bytes)
        generator = None
        if params.seed is not None and params.do_sample:
            generator = make_generator(params.seed, self.runner.device)
        beam = None
        if params.num_beams > 1:
            # generate itself prepares processors and stopping criteria: exact semantics.
            prepared = prepare_generation(
                self.runner.hf_models[model],
                prompt_token_ids,
                params.generate_kwargs,
                self.tokenizer,
            )
            beam = BeamSearch(prepared, prompt_token_ids, generator)
        deadline = None if params.max_time is None else time.monotonic() + params.max_time
        state = RequestState(
            request, params, output, generator, beam, companion=companion, deadline=deadline
        )
        self._init_sequence(state, seq)  # first: a grammar that fails to build admits nothing
        self.scheduler.add_request(request)  # raises SchedulerCapacityError if it can never fit
        self._states[request_id] = state
        if self.overlap is not None:
            self.overlap.admit(request_id, params, prompt_len)

    def model_index(self, name: str | None) -> int:
        """The full model `name` selects (None: the default); ModelNotServedError if none."""
        if name is None:
            return 0
        index = self._model_index.get(name)
        if index is None:
            served = ", ".join(n for n in self.model_names if n) or "the default model"
            raise ModelNotServedError(f"no model named {name!r} is served; served: {served}")
        return index

    def _hf_model_for(self, model: int, lora: ServedLoRA | None) -> torch.nn.Module:
        """transformers' model a request of `model` (and `lora`) runs on outside the paged
        forward: the model itself, or a merged copy of it with the adapter's update."""
        if lora is None:
            return self.runner.hf_models[model]
        return self._merged.get(lora)

    def _lane_context(self, hf_model: torch.nn.Module) -> LaneContext:
        return LaneContext(
            hf_model,
            self.tokenizer,
            self.runner.device,
            lambda: self.token_bytes,
            lambda ids: heal_prompt(hf_model, self.tokenizer, ids),
        )

    def _init_sequence(self, state: RequestState, seq: Sequence) -> None:
        state.sequences[seq.seq_id] = SequenceState(
            text=state.output.sequence_text(seq.token_ids[: seq.prompt_len]),
            constraint=self.constraints.make(state.params),  # grammar: a fresh matcher each
        )

    def signal_abort(self, request_id: str) -> None:
        """Thread-safe: a running lane step stops at its next checkpoint; abort_request
        (on the engine thread) still frees the request."""
        self._cancelled.add(request_id)

    def abort_request(self, request_id: str) -> bool:
        self._cancelled.discard(request_id)
        self._lane_prompt_logprobs.pop(request_id, None)
        self._states.pop(request_id, None)
        if self._lanes.pop(request_id, None) is not None:
            return True
        return self.scheduler.abort_request(request_id) is not None

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write copies in every KV cache (the models' and the draft model's)."""
        self.runner.copy_blocks(copies)
        if self.draft is not None:
            self.draft.kv_cache.copy_blocks(copies)

    def has_unfinished(self) -> bool:
        in_flight = self.overlap is not None and self.overlap.in_flight
        return bool(self._lanes) or self.scheduler.has_unfinished() or in_flight

    @property
    def async_scheduling(self) -> bool:
        return self.overlap is not None

    @property
    def num_overlapped_steps(self) -> int:
        return 0 if self.overlap is None else self.overlap.num_steps

    # -- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step of every exclusive-lane run (when it is their turn), then one batch step.
        With async scheduling, an overlapped step while every request allows it; otherwise
        a step in flight is read back first (that call's outputs), then synchronous steps."""
        if self.overlap is not None:
            # A lane uses the model on this thread; a draft model mirrors every step.
            if not self._lanes and self.draft is None and self.overlap.allowed():
                return self._step_overlapped()
            if self.overlap.in_flight:
                return self.overlap.drain()
        if not self._lanes or not self._lanes_turn():
            return self._step_batch()
        start = time.monotonic()
        lanes = self._step_lanes()
        self._lanes_ended = time.monotonic()
        self._lanes_took = self._lanes_ended - start
        return lanes + self._step_batch()

    def _lanes_turn(self) -> bool:
        """Exclusive lanes take at most about half of the engine thread while batch requests
        run: after lane steps that took L seconds, batch steps run alone for L seconds (a
        4-token request beside a contrastive search at its work limit waited for one method
        step per token)."""
        if not self.scheduler.has_unfinished():
            return True
        return time.monotonic() - self._lanes_ended >= self._lanes_took

    def _step_lanes(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for request_id, run in list(self._lanes.items()):
            try:
                seqs = run.step()
            except LaneRequestError as err:  # the request's options: a 422, not a failure
                message, kind, field = f"{type(err).__name__}: {err}", "invalid_request", err.field
            except Exception as err:  # reported like a failed engine request (500)
                logger.exception("request %s failed", request_id)
                message, kind, field = f"{type(err).__name__}: {err}", "internal", None
            else:
                if run.finished:
                    del self._lanes[request_id]
                if seqs or run.finished:
                    diagnostics = run.diagnostics
                    prompt = self._lane_prompt_logprobs.pop(request_id, None)  # once, first
                    outputs.append(
                        RequestOutput(
                            request_id,
                            run.prompt,
                            seqs,
                            run.finished,
                            diagnostics=diagnostics,
                            prompt_logprobs=prompt,
                        )
                    )
                continue
            del self._lanes[request_id]
            self._lane_prompt_logprobs.pop(request_id, None)
            outputs.append(
                RequestOutput(request_id, run.prompt, [], True, message, kind, error_field=field)
            )
        return outputs

    def _step_batch(self) -> list[RequestOutput]:
        # Requests running before the step: the time since the last forward was host work.
        self.runner.step_timer.begin_step(continuing=self.scheduler.num_running > 0)
        sched = self.scheduler.schedule()
        self.num_steps += 1
        self.last_batch_size = len(sched.seqs)
        if sched.is_empty:
            return []
        for observe in self.step_observers:
            observe(len(sched.seqs))
        sampling = [item for item in sched.seqs if item.sample]
        failures: list[RequestOutput] = []
        try:
            result = self._forward(sched)
        except Exception:  # find the request that broke it: the others go on
            logger.exception("batched forward failed: retrying its requests one at a time")
            result, broken = self._forward_isolated(sched, sampling)
            sampling = [item for item in sampling if item.request_id not in broken]
            failures = self._fail(broken)  # before the scheduler advances
        logits = result.logits
        self._record_prompt_logprobs(result.prompt_logprobs)
        self.scheduler.update_from_output(sched)
        outputs: dict[str, RequestOutput] = {}
        failed: dict[str, Exception] = {}
        # Rows of `logits` per request, in the order of the request's sequences (an item
        # with drafts has more rows: this is its first, the rest are verified below).
        groups: dict[str, dict[int, int]] = {}
        for row, item in zip(first_logits_rows(sampling), sampling, strict=True):
            groups.setdefault(item.request_id, {})[item.seq_id] = row
        plain: list[tuple[RequestState, dict[int, int]]] = []
        for request_id, rows in groups.items():
            state = self._states[request_id]
            if state.params.max_new_tokens == 0:  # prompt only: its prefill is all it asked
                self._finish_prompt_only(state, outputs)
                continue
            if state.beam is None:
                plain.append((state, rows))
                continue
            try:
                self._beam_step(state, logits[list(rows.values())], outputs)
            except Exception as err:
                logger.exception("request %s failed", request_id)
                failed[request_id] = err
        for state, seqs, picks in sample_groups(self.sampler, logits, plain, failed):
            try:
                if len(seqs) > len(state.request.seqs):  # first token of n > 1 sequences
                    self._fork_siblings(state)
                    seqs = state.request.seqs
                for seq, pick in zip(seqs, picks, strict=True):
                    self._advance(state, seq, pick, outputs)
            except Exception as err:
                logger.exception("request %s failed", state.request.request_id)
                failed[state.request.request_id] = err
        self.spec.verify(sampling, logits, outputs, failed)
        self.spec.propose(sampling)
        return list(outputs.values()) + failures + (self._fail(failed) if failed else [])

    def _step_overlapped(self) -> list[RequestOutput]:
        """Schedule step k+1 and hand it to the overlapped steps (async_scheduling.py):
        launched on the step worker, then step k's outputs, processed here."""
        assert self.overlap is not None
        sched = self.scheduler.schedule()
        self.num_steps += 1
        self.last_batch_size = len(sched.seqs)
        if sched.is_empty:
            return self.overlap.drain()
        for observe in self.step_observers:
            observe(len(sched.seqs))
        return self.overlap.step(sched)

    def _forward(
        self, sched: SchedulerOutput, handed_off: torch.Tensor | None = None
    ) -> StepResult:
        """``handed_off``: async scheduling's tokens still on the device (execute_step)."""
        result = self.runner.execute_step(sched, handed_off=handed_off)
        if self.draft is not None:
            self.draft.mirror(sched)  # the draft's KV follows the target's, slot for slot
        return result

    def _record_prompt_logprobs(
        self, chunks: list[tuple[ScheduledSeq, list[PromptLogprob]]]
    ) -> None:
        for item, entries in chunks:
            state = self._states.get(item.request_id)
            if state is None:
                continue  # aborted while the step ran
            if state.output.add_prompt_logprobs(item.start_pos + 1, entries):
                # All computed: a recompute after preemption needs no logits and may hit
                # the prefix cache.
                state.request.prompt_logprobs = None

    def _finish_prompt_only(self, state: RequestState, outputs: dict[str, RequestOutput]) -> None:
        out = self._output_for(state.request, outputs)
        out.outputs.append(SequenceOutput(0, "", [], 0, FinishReason.LENGTH))
        self._finish(state, out, FinishReason.LENGTH)

    def _forward_isolated(
        self,
        sched: SchedulerOutput,
        sampling: list[ScheduledSeq],
        handed_off: torch.Tensor | None = None,
    ) -> tuple[StepResult, dict[str, Exception]]:
        """The step's forward again, one request at a time: a request whose forward raises
        fails alone (with its own error), the others get their logits rows as before.
        Re-running a chunk rewrites the same KV slots, so the failed batched run left nothing
        behind; copy-on-write copies run once, with the first request."""
        groups: dict[str, list[ScheduledSeq]] = {}
        for item in sched.seqs:
            groups.setdefault(item.request_id, []).append(item)
        rows: dict[int, torch.Tensor] = {}  # id(item) -> its logits rows
        prompt: list[tuple[ScheduledSeq, list[PromptLogprob]]] = []
        failed: dict[str, Exception] = {}
        copies = sched.cow_copies
        for request_id, items in groups.items():
            tokens = sum(len(item.token_ids) for item in items)
            alone = SchedulerOutput(seqs=items, cow_copies=copies, num_batched_tokens=tokens)
            copies = []
            try:
                result = self._forward(alone, handed_off)
            except Exception as err:
                logger.exception("request %s failed in the forward", request_id)
                failed[request_id] = err
                continue
            logits = result.logits
            prompt += result.prompt_logprobs
            row = 0
            for item in (i for i in items if i.sample):
                n = 1 + len(item.draft_token_ids)
                rows[id(item)] = logits[row : row + n]
                row += n
        kept = [rows[id(item)] for item in sampling if item.request_id not in failed]
        if not kept:
            return StepResult(torch.empty(0), prompt), failed
        return StepResult(torch.cat(kept), prompt), failed

    def _advance(
        self,
        state: RequestState,
        seq: Sequence,
        pick: GeneratedToken,
        outputs: dict[str, RequestOutput],
    ) -> None:
        """A chosen token of a plain (non-beam) sequence: stop checks, then the output."""
        token = pick.id
        request = state.request
        if state.first_token_time is None:
            state.first_token_time = time.monotonic()
        seq.token_ids.append(token)
        if state.companion is not None:
            state.companion.token_ids.append(token)
        reason = state.output.check(seq.token_ids)
        seq_state = state.sequences[seq.seq_id]
        if seq_state.constraint is not None:  # feeds the grammar; eos when it is complete
            reason = seq_state.constraint.advance(token, reason)
        if reason is None and state.deadline is not None and time.monotonic() > state.deadline:
            reason = FinishReason.LENGTH  # MaxTimeCriteria: generate stops, no other reason
        assert seq_state.text is not None
        output = state.output.token_output(
            request.seqs.index(seq), seq_state.text, pick, reason, seq.num_output_tokens
        )
        if reason is not None:
            self.scheduler.finish_sequence(seq, reason)
        out = self._output_for(request, outputs)
        out.outputs.append(output)
        if not any(s is not state.companion for s in request.live_seqs):
            self._finish(state, out, reason or FinishReason.LENGTH)

    def _fork_siblings(self, state: RequestState) -> None:
        """num_return_sequences > 1: after the prompt, fork the siblings (shared blocks)."""
        request = state.request
        parent = request.seqs[0]
        for _ in range(request.max_num_seqs - 1):
            child = parent.fork()
            self._init_sequence(state, child)
            self.scheduler.fork_sequence(parent, child)
            request.seqs.append(child)

    def _beam_step(
        self, state: RequestState, logits: torch.Tensor, outputs: dict[str, RequestOutput]
    ) -> None:
        request, beam = state.request, state.beam
        assert beam is not None
        step = beam.step(logits)
        old = request.seqs
        new: list[Sequence] = []
        used: set[int] = set()
        for parent_index in step.parents:  # forks first: they copy the parent's tokens
            parent = old[parent_index if len(old) > 1 else 0]
            if parent.seq_id in used:
                child = parent.fork()
                self.scheduler.fork_sequence(parent, child)
            else:
                child = parent
                used.add(parent.seq_id)
            new.append(child)
        for seq, token in zip(new, step.tokens, strict=True):
            seq.token_ids.append(token)
        self.scheduler.replace_sequences(request, new)
        if state.first_token_time is None:
            state.first_token_time = time.monotonic()
        if not step.done:
            return
        out = self._output_for(request, outputs)
        for index, (tokens, score) in enumerate(beam.results()):
            out.outputs.append(state.output.whole_sequence(index, tokens, score))
        self._finish(state, out, out.outputs[0].finish_reason or FinishReason.LENGTH)

    def _output_for(self, request: Request, outputs: dict[str, RequestOutput]) -> RequestOutput:
        out = outputs.get(request.request_id)
        if out is None:
            first = request.seqs[0]
            state = self._states.get(request.request_id)
            out = RequestOutput(
                request.request_id,
                first.token_ids[: first.prompt_len],
                [],
                finished=False,
                num_preemptions=request.num_preemptions,
                num_cached_tokens=request.num_cached_tokens,
                prompt_logprobs=None if state is None else state.output.take_prompt_logprobs(),
            )
            outputs[request.request_id] = out
        return out

    def _finish(self, state: RequestState, out: RequestOutput, reason: FinishReason) -> None:
        out.finished = True
        self.scheduler.finish_request(state.request.request_id, reason)
        self._states.pop(state.request.request_id, None)

    def _fail(self, errors: dict[str, Exception]) -> list[RequestOutput]:
        outs = []
        for request_id, err in errors.items():
            state = self._states.pop(request_id, None)
            request = self.scheduler.finish_request(request_id, FinishReason.ERROR)
            if request is None and state is None:
                continue
            prompt = request.seqs[0].token_ids[: request.seqs[0].prompt_len] if request else []
            message = f"{type(err).__name__}: {err}"
            outs.append(
                RequestOutput(
                    request_id, prompt, [], finished=True, error=message, error_kind="internal"
                )
            )
        return outs

    # -- introspection -------------------------------------------------------------------
    def check_integrity(self) -> None:
        self.kv.check_integrity()

    def lora_activity(self) -> tuple[list[str], list[str]]:
        """Names of the LoRA adapters of running and of waiting requests (metrics)."""

        def names(requests: Iterable[Request]) -> list[str]:
            return sorted({r.lora.name for r in requests if r.lora is not None})

        return names(self.scheduler.running), names(self.scheduler.waiting)

    def requests_by_model(self) -> tuple[list[int], list[int]]:
        """Running and waiting requests of each full model, indexed as `model_names`
        (metrics). Read from another thread: RuntimeError when a queue changes mid-read."""

        def counts(requests: Iterable[Request]) -> list[int]:
            per_model = [0] * len(self.model_names)
            for request in requests:
                per_model[request.model] += 1
            return per_model

        return counts(self.scheduler.running), counts(self.scheduler.waiting)

    def stats(self) -> dict[str, float]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_usage": self.kv.usage,
            "kv_free_blocks": self.kv.num_free_blocks,
            "kv_total_blocks": self.kv.num_blocks,
            "prefix_queries": self.kv.prefix_queries,
            "prefix_hits": self.kv.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.num_steps,
            "spec_draft_tokens": self.spec.num_draft_tokens,
            "spec_accepted_tokens": self.spec.num_accepted_tokens,
            "last_batch_size": self.last_batch_size,
            **self.runner.step_timer.stats(),
        }
