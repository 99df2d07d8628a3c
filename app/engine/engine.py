"""LLMEngine: one synchronous step of continuous batching over the paged KV cache.

Each `step()` asks the scheduler for work, runs one varlen forward, samples one token for
every sequence that reached its last token, runs stop checks and incremental
detokenization, and returns a `RequestOutput` per request that produced something.
The threaded asyncio front end lives in async_engine.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.kv_cache_manager import KVCacheManager
from app.engine.model_runner import ModelRunner
from app.engine.request import FinishReason, Request, Sequence
from app.engine.sampler import Sampler, SamplingRow, make_generator
from app.engine.sampling_params import SamplingParams
from app.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from app.engine.stop import StopChecker, StopStringTextFilter, token_bytes_table

logger = logging.getLogger("kogpt.engine")


@dataclass
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    seed: int = 0


@dataclass
class SequenceOutput:
    """What one sequence produced in one step (deltas), plus running totals."""

    index: int
    text: str  # new text, UTF-8 complete, stop strings cut
    token_ids: list[int]  # new token ids
    logprobs: list[float]
    num_output_tokens: int
    finish_reason: FinishReason | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[SequenceOutput]
    finished: bool
    error: str | None = None
    num_preemptions: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _RequestState:
    request: Request
    params: SamplingParams
    stop: StopChecker
    generator: torch.Generator | None
    first_token_time: float | None = None


class LLMEngine:
    def __init__(self, hf_model: torch.nn.Module, tokenizer: Any, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(hf_model, config.num_blocks, config.block_size)
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.kv
        )
        self.sampler = Sampler(torch.Generator(device=self.runner.device).manual_seed(config.seed))
        self._token_bytes: list[bytes] | None = None
        self._states: dict[str, _RequestState] = {}
        self.num_steps = 0
        self.last_batch_size = 0

    # -- requests ------------------------------------------------------------------------
    @property
    def token_bytes(self) -> list[bytes]:
        if self._token_bytes is None:  # built lazily: only stop strings need it
            self._token_bytes = token_bytes_table(self.tokenizer)
        return self._token_bytes

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        prompt_len = len(prompt_token_ids)
        seq = Sequence.from_prompt(prompt_token_ids)
        request = Request(
            request_id,
            [seq],
            max_total_tokens=params.stop_length(prompt_len),
            params=params,
            max_num_seqs=params.num_return_sequences,
        )
        stop = StopChecker(params, prompt_len, self.token_bytes if params.stop_strings else None)
        self.scheduler.add_request(request)  # raises SchedulerCapacityError if it can never fit
        generator = None
        if params.seed is not None and params.do_sample:
            generator = make_generator(params.seed, self.runner.device)
        self._init_sequence(seq, params)
        self._states[request_id] = _RequestState(request, params, stop, generator)

    def _init_sequence(self, seq: Sequence, params: SamplingParams) -> None:
        seq.data["detok"] = IncrementalDetokenizer(self.tokenizer, seq.token_ids[: seq.prompt_len])
        seq.data["filter"] = StopStringTextFilter(params.stop_strings)

    def abort_request(self, request_id: str) -> bool:
        self._states.pop(request_id, None)
        return self.scheduler.abort_request(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.num_steps += 1
        self.last_batch_size = len(sched.seqs)
        if sched.is_empty:
            return []
        sampling = [item for item in sched.seqs if item.sample]
        try:
            logits = self.runner.execute(sched)
        except Exception as err:  # a broken forward fails the requests in it, not the engine
            logger.exception("forward failed")
            return self._fail({item.request_id for item in sched.seqs}, err)
        self.scheduler.update_from_output(sched)
        if not sampling:
            return []
        tokens, logprobs, failed = self._sample(logits, sampling)
        outputs: dict[str, RequestOutput] = {}
        for row, item in enumerate(sampling):
            if item.request_id in failed:
                continue
            try:
                self._advance(item, tokens[row], logprobs[row], outputs)
            except Exception as err:
                logger.exception("request %s failed", item.request_id)
                failed[item.request_id] = err
        result = list(outputs.values())
        result += self._fail(set(failed), failed) if failed else []
        return result

    def _sample(
        self, logits: torch.Tensor, items: list[ScheduledSeq]
    ) -> tuple[list[int], list[float], dict[str, Exception]]:
        """Batched sampling; if the batch raises, rows are retried one by one to isolate it."""
        rows = []
        failed: dict[str, Exception] = {}
        for item in items:
            state = self._states[item.request_id]
            seq = self._find_seq(state.request, item.seq_id)
            rows.append(
                SamplingRow.from_params(
                    state.params, seq.token_ids, seq.prompt_len, state.generator
                )
            )
        try:
            out = self.sampler.sample(logits, rows)
            return out.token_ids, out.logprobs, failed
        except Exception:
            tokens, logprobs = [0] * len(items), [0.0] * len(items)
            for i, (item, row) in enumerate(zip(items, rows, strict=True)):
                try:
                    one = self.sampler.sample(logits[i : i + 1], [row])
                    tokens[i], logprobs[i] = one.token_ids[0], one.logprobs[0]
                except Exception as err:
                    failed[item.request_id] = err
            return tokens, logprobs, failed

    def _advance(
        self, item: ScheduledSeq, token: int, logprob: float, outputs: dict[str, RequestOutput]
    ) -> None:
        state = self._states[item.request_id]
        request = state.request
        seq = self._find_seq(request, item.seq_id)
        seq.token_ids.append(token)
        if state.first_token_time is None:
            state.first_token_time = time.monotonic()
        reason = state.stop.check(seq.token_ids)
        detok: IncrementalDetokenizer = seq.data["detok"]
        text_filter: StopStringTextFilter = seq.data["filter"]
        delta = detok.add(token)
        if reason is None:
            text = text_filter.push(delta)
        else:
            text = text_filter.finish(delta + detok.flush(), reason)
            self.scheduler.finish_sequence(seq, reason)
        out = outputs.get(request.request_id)
        if out is None:
            out = RequestOutput(
                request.request_id,
                request.seqs[0].token_ids[: request.seqs[0].prompt_len],
                [],
                finished=False,
                num_preemptions=request.num_preemptions,
            )
            outputs[request.request_id] = out
        index = request.seqs.index(seq)
        out.outputs.append(
            SequenceOutput(index, text, [token], [logprob], seq.num_output_tokens, reason)
        )
        if not request.live_seqs:
            out.finished = True
            self.scheduler.finish_request(request.request_id, reason or FinishReason.LENGTH)
            self._states.pop(request.request_id, None)

    @staticmethod
    def _find_seq(request: Request, seq_id: int) -> Sequence:
        for seq in request.seqs:
            if seq.seq_id == seq_id:
                return seq
        raise KeyError(f"sequence {seq_id} not in request {request.request_id}")

    def _fail(
        self, request_ids: set[str], errors: Exception | dict[str, Exception]
    ) -> list[RequestOutput]:
        outs = []
        for request_id in request_ids:
            err = errors if isinstance(errors, Exception) else errors[request_id]
            state = self._states.pop(request_id, None)
            request = self.scheduler.finish_request(request_id, FinishReason.ERROR)
            if request is None and state is None:
                continue
            prompt = request.seqs[0].token_ids[: request.seqs[0].prompt_len] if request else []
            outs.append(
                RequestOutput(
                    request_id, prompt, [], finished=True, error=f"{type(err).__name__}: {err}"
                )
            )
        return outs

    # -- introspection -------------------------------------------------------------------
    def check_integrity(self) -> None:
        self.kv.check_integrity()

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
            "last_batch_size": self.last_batch_size,
        }
