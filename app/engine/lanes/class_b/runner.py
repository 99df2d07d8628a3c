"""Serving a class-B request: one decoding step per engine step (an exclusive lane run).

The methods need what the paged batch forward does not give: k candidate forwards per token
and the hidden states of the last layer (contrastive), the hidden states of every layer
(DoLa), beams re-ranked by constraint banks or by group with a per-group penalty (group and
constrained beam search). So each request runs alone on transformers' GPT2LMHeadModel with its
own DynamicCache, on the engine thread (the model's one owner), one step per call, or one
chunk of a long step (the method's `PAUSE`s): between two calls the engine runs its batch
steps, so other requests keep going.

`ClassBRun` turns the method's steps into engine-shaped `SequenceOutput`s through the engine's
one output path (output_processor.py): token-by-token methods (contrastive, DoLa) stream a
token per step with its logprob and alternatives; beam methods deliver their sequences at the
end.
Options reach the method as `model.generate` prepares them (processors, stopping criteria,
through `custom_generate`, as the engine's beam search does).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import torch

from app.engine.beam_search import prepare_generation
from app.engine.core.request import FinishReason
from app.engine.lanes.class_b.common import (
    ABORTED,
    DEADLINE,
    BeamOutcome,
    MethodInputs,
    Pause,
    StepInterrupted,
    StepIterator,
    TokenChoice,
    never_interrupted,
)
from app.engine.lanes.class_b.constrained_beam import constrained_beam_search
from app.engine.lanes.class_b.constraints import build_constraint
from app.engine.lanes.class_b.contrastive import contrastive_search
from app.engine.lanes.class_b.dola import dola_decoding
from app.engine.lanes.class_b.group_beam import group_beam_search
from app.engine.lanes.context import LaneContext, LaneRequestError, generate_kwargs
from app.engine.output_processor import OutputProcessor, SequenceText, chosen_token
from app.engine.outputs import SequenceOutput
from app.engine.sample.row import make_generator
from app.options.class_b import CONSTRAINED, CONTRASTIVE, DOLA, ClassBParams

_END = object()  # the method's iterator is exhausted


def method_inputs(
    model: Any,
    prompt: list[int],
    params: ClassBParams,
    tokenizer: Any = None,
    healed: bool = False,
    checkpoint: Callable[[], None] = never_interrupted,
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
        checkpoint,
    )


def start_method(
    model: Any,
    prompt: list[int],
    params: ClassBParams,
    tokenizer: Any = None,
    healed: bool = False,
    checkpoint: Callable[[], None] = never_interrupted,
) -> StepIterator:
    """The method's step iterator for one prompt (call on the model's owner thread)."""
    opts = params.class_b
    assert opts is not None
    inputs = method_inputs(model, prompt, params, tokenizer, healed, checkpoint)
    if opts.method == CONTRASTIVE:
        return contrastive_search(inputs, opts.penalty_alpha, params.top_k)
    if opts.method == DOLA:
        layers = opts.dola_layers
        return dola_decoding(inputs, list(layers) if isinstance(layers, tuple) else layers)  # type: ignore[arg-type]
    if opts.method == CONSTRAINED:
        return constrained_beam_search(inputs, [build_constraint(c) for c in opts.constraints])
    return group_beam_search(inputs, opts.num_beam_groups, opts.diversity_penalty)


class ClassBRun:
    """One class-B request on the engine; `step()` runs one chunk of a decoding step (engine
    thread): a whole step when it is short, else up to the method's next `PAUSE`.
    `aborted` says (from any thread) that the client has gone: the method's checkpoints then
    end the step between two chunks of work, as they do once max_time has passed."""

    def __init__(
        self,
        lane: LaneContext,
        prompt: list[int],
        params: ClassBParams,
        aborted: Callable[[], bool] = lambda: False,
    ) -> None:
        self.lane = lane
        self.prompt = prompt
        self.params = params
        self.aborted = aborted
        self.deadline: float | None = None
        self.steps_done = 0
        self.method: StepIterator | None = None
        self.tokens: list[int] = []
        self.finished = False
        self.diagnostics: dict[str, list[Any]] | None = None

    def _start(self) -> None:
        if self.params.token_healing:
            self.prompt = self.lane.heal(self.prompt)  # the engine's own admission step
        self.out = OutputProcessor(
            self.params, self.prompt, self.lane.tokenizer, self.lane.token_bytes
        )
        self.text: SequenceText = self.out.sequence_text()
        healed = self.params.token_healing
        if self.params.max_time is not None:  # generate's MaxTimeCriteria starts here too
            self.deadline = time.monotonic() + self.params.max_time
        self.method = start_method(
            self.lane.model, self.prompt, self.params, self.lane.tokenizer, healed, self.checkpoint
        )

    def checkpoint(self) -> None:
        """Called by the method between chunks of a step: stop now if the request must."""
        if self.aborted():
            raise StepInterrupted(ABORTED)
        # generate checks max_time after each step, so its first step always completes
        past = self.deadline is not None and time.monotonic() > self.deadline
        if past and self.steps_done > 0:
            raise StepInterrupted(DEADLINE)

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """The outputs of one chunk: a decoding step's when it ends one ([] after a chunk
        that ends mid-step, and while beams are still searching)."""
        if self.method is None:
            try:
                self._start()
            except (ValueError, TypeError) as err:
                raise LaneRequestError(f"{type(err).__name__}: {err}") from err
        assert self.method is not None
        try:
            step = next(self.method, _END)
        except StepInterrupted as stop:
            if stop.reason == ABORTED:  # nobody listens: end without another output
                self.finished = True
                return []
            step = _END  # max_time inside a step ends it as generate's criteria would
        if isinstance(step, Pause):
            return []  # a chunk of a long step: the rest at the next engine step
        self.steps_done += 1
        if isinstance(step, TokenChoice):
            return [self._token(step)]
        if isinstance(step, BeamOutcome):
            self.finished = True
            return [
                self.out.whole_sequence(index, row, score)
                for index, (row, score) in enumerate(step.hypotheses)
            ]
        if step is _END:
            self.finished = True  # generate's criteria stopped it (max_time): no more tokens
            text = self.text.finish(FinishReason.LENGTH)
            return [SequenceOutput(0, text, [], len(self.tokens), FinishReason.LENGTH)]
        return []  # a beam step: nothing to report until the search ends

    def _token(self, choice: TokenChoice) -> SequenceOutput:
        token = choice.token
        self.tokens.append(token)
        reason = self.out.check(self.prompt + self.tokens)
        self.finished = reason is not None
        logprobs = torch.log_softmax(choice.scores.double(), dim=-1)
        chosen = chosen_token(logprobs, token, self.params.top_n_tokens)
        return self.out.token_output(0, self.text, chosen, reason, len(self.tokens))


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


def run_method(
    model: Any, prompt: list[int], params: ClassBParams, tokenizer: Any = None
) -> list[tuple[list[int], float | None]]:
    """The whole method at once, without the engine (tests, benchmarks): per returned
    sequence its generated ids and its score (beams; the sum of the chosen tokens'
    logprobs for token-by-token methods), stopped by generate's criteria alone."""
    tokens: list[int] = []
    total = 0.0
    with torch.inference_mode():
        for step in start_method(model, prompt, params, tokenizer):  # pauses run on at once
            if isinstance(step, BeamOutcome):
                return list(step.hypotheses)  # type: ignore[arg-type]
            if isinstance(step, TokenChoice):
                tokens.append(step.token)
                total += float(torch.log_softmax(step.scores.double(), dim=-1)[step.token])
    return [(tokens, total)]
