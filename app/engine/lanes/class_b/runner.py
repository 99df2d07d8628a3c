"""Serving a class-B request: one decoding step per `AsyncEngine.run_exclusive` call.

The methods need what the paged batch forward does not give: k candidate forwards per token
and the hidden states of the last layer (contrastive), the hidden states of every layer
(DoLa), beams re-ranked by constraint banks or by group with a per-group penalty (group and
constrained beam search). So each request runs alone on transformers' GPT2LMHeadModel with its
own DynamicCache, on the engine thread (the model's one owner), one step per call: between
two of its steps the engine runs its batch steps, so other requests keep going.

`ClassBRun` turns the method's steps into engine-shaped `SequenceOutput`s with the engine's
own stop checker and detokenizer: token-by-token methods (contrastive, DoLa) stream a token
per step with its logprob and alternatives; beam methods deliver their sequences at the end.
Options reach the method as `model.generate` prepares them (processors, stopping criteria,
through `custom_generate`, as the engine's beam search does).
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch

from app.engine.async_engine import AsyncEngine
from app.engine.beam_search import prepare_generation
from app.engine.core.request import FinishReason
from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.engine import LLMEngine
from app.engine.lanes.class_b.common import BeamOutcome, MethodInputs, StepIterator, TokenChoice
from app.engine.lanes.class_b.constrained_beam import constrained_beam_search
from app.engine.lanes.class_b.constraints import build_constraint
from app.engine.lanes.class_b.contrastive import contrastive_search
from app.engine.lanes.class_b.dola import dola_decoding
from app.engine.lanes.class_b.group_beam import group_beam_search
from app.engine.lanes.class_b.options import CONSTRAINED, CONTRASTIVE, DOLA, ClassBParams
from app.engine.outputs import RequestOutput, SequenceOutput
from app.engine.sample.row import make_generator
from app.engine.stop import StopChecker, StopStringTextFilter

logger = logging.getLogger("kogpt.engine")
_END = object()  # the method's iterator is exhausted


class ClassBRequestError(ValueError):
    """transformers' generate refused the request's options while preparing (a 422)."""


def generate_kwargs(params: ClassBParams, healed: bool) -> dict[str, Any]:
    """The request's options for `model.generate` (as the exact lane passes them)."""
    kwargs = params.generate_kwargs
    if healed:  # the healed prompt may differ in length: count new tokens, as the engine does
        del kwargs["max_length"], kwargs["min_length"]
        kwargs["max_new_tokens"] = params.max_new_tokens
        if params.min_new_tokens:
            kwargs["min_new_tokens"] = params.min_new_tokens
    if params.ignore_eos:
        kwargs["eos_token_id"] = None
    if kwargs.get("watermarking_config") is not None:
        from transformers.generation import WatermarkingConfig

        kwargs["watermarking_config"] = WatermarkingConfig(**kwargs["watermarking_config"])
    return kwargs


def method_inputs(
    model: Any,
    prompt: list[int],
    params: ClassBParams,
    tokenizer: Any = None,
    healed: bool = False,
) -> MethodInputs:
    """The model, prompt, and what `model.generate` prepares for these options."""
    kwargs = generate_kwargs(params, healed)
    if params.negative_prompt_ids is not None:
        device = next(model.parameters()).device
        kwargs["negative_prompt_ids"] = torch.tensor([params.negative_prompt_ids], device=device)
    prepared = prepare_generation(model, prompt, kwargs, tokenizer)
    generator = None
    if params.do_sample:  # DoLa sampling: the request's own stream, as manual_seed(seed) gives
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = make_generator(seed, next(model.parameters()).device)
    return MethodInputs(
        model,
        prompt,
        prepared.logits_processor,
        prepared.stopping_criteria,
        prepared.generation_config,
        generator,
    )


def start_method(
    model: Any,
    prompt: list[int],
    params: ClassBParams,
    tokenizer: Any = None,
    healed: bool = False,
) -> StepIterator:
    """The method's step iterator for one prompt (call on the model's owner thread)."""
    opts = params.class_b
    assert opts is not None
    inputs = method_inputs(model, prompt, params, tokenizer, healed)
    if opts.method == CONTRASTIVE:
        return contrastive_search(inputs, opts.penalty_alpha, params.top_k)
    if opts.method == DOLA:
        layers = opts.dola_layers
        return dola_decoding(inputs, list(layers) if isinstance(layers, tuple) else layers)  # type: ignore[arg-type]
    if opts.method == CONSTRAINED:
        return constrained_beam_search(inputs, [build_constraint(c) for c in opts.constraints])
    return group_beam_search(inputs, opts.num_beam_groups, opts.diversity_penalty)


class ClassBRun:
    """One class-B request on the engine; `step()` runs one decoding step (engine thread)."""

    def __init__(self, engine: LLMEngine, prompt: list[int], params: ClassBParams) -> None:
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.method: StepIterator | None = None
        self.tokens: list[int] = []
        self.finished = False

    def _start(self) -> None:
        if self.params.token_healing:
            self.prompt = self.engine._heal(self.prompt)  # the engine's own admission step
        self.checker = StopChecker(
            self.params,
            len(self.prompt),
            self.engine.token_bytes if self.params.stop_strings else None,
        )
        self.detok = IncrementalDetokenizer(self.engine.tokenizer, self.prompt)
        self.text_filter = StopStringTextFilter(self.params.stop_strings)
        model = self.engine.runner.hf_model
        self.method = start_method(
            model, self.prompt, self.params, self.engine.tokenizer, self.params.token_healing
        )

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """The outputs of one decoding step ([] while beams are still searching)."""
        if self.method is None:
            try:
                self._start()
            except (ValueError, TypeError) as err:
                raise ClassBRequestError(f"{type(err).__name__}: {err}") from err
        assert self.method is not None
        step = next(self.method, _END)
        if isinstance(step, TokenChoice):
            return [self._token(step)]
        if isinstance(step, BeamOutcome):
            self.finished = True
            return self._beams(step)
        if step is _END:
            self.finished = True  # generate's criteria stopped it (max_time): no more tokens
            text = self.text_filter.finish(self.detok.flush(), FinishReason.LENGTH)
            return [SequenceOutput(0, text, [], [], len(self.tokens), FinishReason.LENGTH)]
        return []  # a beam step: nothing to report until the search ends

    def _token(self, choice: TokenChoice) -> SequenceOutput:
        token = choice.token
        self.tokens.append(token)
        reason = self.checker.check(self.prompt + self.tokens)
        logprobs = torch.log_softmax(choice.scores.double(), dim=-1)
        top_n = min(self.params.top_n_tokens, logprobs.shape[-1])
        top_lp, top_ids = torch.topk(logprobs, top_n)
        keep = [j for j, v in enumerate(top_lp.tolist()) if v != -float("inf")]
        delta = self.detok.add(token)
        if reason is None:
            text = self.text_filter.push(delta)
        else:
            self.finished = True
            text = self.text_filter.finish(delta + self.detok.flush(), reason)
        return SequenceOutput(
            0,
            text,
            [token],
            [float(logprobs[token])],
            len(self.tokens),
            reason,
            top_token_ids=[[int(top_ids[j]) for j in keep]],
            top_logprobs=[[float(top_lp[j]) for j in keep]],
        )

    def _beams(self, outcome: BeamOutcome) -> list[SequenceOutput]:
        """The returned sequences, cut where the engine's stop checks end them."""
        outputs = []
        for index, (row, score) in enumerate(outcome.hypotheses):
            tokens: list[int] = []
            reason = None
            for token in row:
                tokens.append(token)
                reason = self.checker.check(self.prompt + tokens)
                if reason is not None:
                    break
            reason = reason or FinishReason.LENGTH
            text = StopStringTextFilter(self.params.stop_strings).finish(
                self.engine.tokenizer.decode(tokens, skip_special_tokens=True), reason
            )
            outputs.append(
                SequenceOutput(index, text, tokens, [], len(tokens), reason, score=score)
            )
        return outputs


def rows_error(params: ClassBParams, max_num_seqs: int) -> str | None:
    """The method's batch rows (beams; contrastive search's top_k candidates) are bounded by
    the engine's sequence cap (--max-num-seqs), as a plain beam request's sequences are."""
    assert params.class_b is not None
    if params.class_b.method == CONTRASTIVE:
        name, rows = "top_k", params.top_k
    else:
        name, rows = "num_beams", params.num_beams
    if rows <= max_num_seqs:
        return None
    return f"`{name}` ({rows}) needs {rows} model rows per step but max_num_seqs is {max_num_seqs}"


async def generate_class_b(
    async_engine: AsyncEngine,
    prompt: list[int],
    params: ClassBParams,
    request_id: str | None = None,
) -> AsyncIterator[RequestOutput]:
    """Stream a class-B request's outputs as the engine streams its own (same types).
    Closing the iterator early abandons the request: its state is simply dropped."""
    async_engine.check_admission()
    request_id = request_id or uuid.uuid4().hex
    too_many = rows_error(params, async_engine.engine.config.max_num_seqs)
    if too_many is not None:  # as the scheduler refuses a request that can never fit
        yield RequestOutput(request_id, prompt, [], True, too_many, "invalid_request")
        return
    run = ClassBRun(async_engine.engine, prompt, params)
    while not run.finished:
        try:
            outputs = await async_engine.run_exclusive(run.step)
        except ClassBRequestError as err:
            yield RequestOutput(request_id, prompt, [], True, str(err), "invalid_request")
            return
        except Exception as err:  # reported like a failed engine request (500)
            logger.exception("class-B request %s failed", request_id)
            message = f"{type(err).__name__}: {err}"
            yield RequestOutput(request_id, run.prompt, [], True, message, "internal")
            return
        if outputs or run.finished:
            yield RequestOutput(request_id, run.prompt, outputs, run.finished)


def run_method(
    model: Any, prompt: list[int], params: ClassBParams, tokenizer: Any = None
) -> list[tuple[list[int], float | None]]:
    """The whole method at once, without the engine (tests, benchmarks): per returned
    sequence its generated ids and its score (beams; the sum of the chosen tokens'
    logprobs for token-by-token methods), stopped by generate's criteria alone."""
    tokens: list[int] = []
    total = 0.0
    with torch.inference_mode():
        for step in start_method(model, prompt, params, tokenizer):
            if isinstance(step, BeamOutcome):
                return list(step.hypotheses)  # type: ignore[arg-type]
            if isinstance(step, TokenChoice):
                tokens.append(step.token)
                total += float(torch.log_softmax(step.scores.double(), dim=-1)[step.token])
    return [(tokens, total)]
