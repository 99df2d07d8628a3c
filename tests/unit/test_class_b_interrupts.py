"""Aborts and deadlines inside a class-B step: a hang-up or an expired max_time takes effect
at the method's next checkpoint (before or after a forward, per premature layer, per beam),
not after the rest of a long step. Counted in model calls and checkpoints, never in time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from app.engine.core.request import FinishReason
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.lanes.class_b import runner as runner_module
from app.engine.lanes.class_b.runner import ClassBRun
from tests.fake_clock import fake_monotonic
from tests.unit.class_b_helpers import class_b_params

PROMPT = [5, 9, 14, 22, 9]
METHODS = {
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
    "dola": {"dola_layers": [0, 1, 1]},
    "constrained_beam": {"num_beams": 4, "force_words_ids": [[7], [[11, 12], [13]]]},
}


@pytest.fixture(scope="module")
def engine(
    tiny_model: GPT2LMHeadModel, tiny_tokenizer: PreTrainedTokenizerFast, one_thread: None
) -> Iterator[LLMEngine]:
    yield LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(num_blocks=32, max_num_seqs=8))


class Calls:
    """Counts the model's forwards and LM-head calls; runs `on_forward` inside the n-th."""

    def __init__(self, model: Any) -> None:
        self.forwards = 0
        self.lm_heads = 0
        self.fire_at: int | None = None
        self.on_forward: Any = None
        self.handles = [
            model.transformer.register_forward_hook(self._forward),
            model.get_output_embeddings().register_forward_hook(self._lm_head),
        ]

    def _forward(self, *_: Any) -> None:
        self.forwards += 1
        if self.forwards == self.fire_at:
            self.on_forward()

    def _lm_head(self, *_: Any) -> None:
        self.lm_heads += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture()
def calls(engine: LLMEngine) -> Iterator[Calls]:
    counter = Calls(engine.runner.hf_model)
    yield counter
    counter.remove()


def add(engine: LLMEngine, request_id: str, **options: Any) -> None:
    params = class_b_params(engine.runner.hf_model, len(PROMPT), max_new_tokens=40, **options)
    params.ignore_eos = True
    engine.add_request(request_id, list(PROMPT), params)


def run_steps(engine: LLMEngine, request_id: str, steps: int) -> list[Any]:
    """Engine steps until the run has done `steps` whole method steps (a long step takes
    several engine steps, one chunk each); their outputs."""
    run = engine._lanes[request_id]
    assert isinstance(run, ClassBRun)
    outputs: list[Any] = []
    while run.steps_done < steps:
        outputs += engine.step()
    return outputs


# The LM-head calls that the interrupted forward's chunk makes: the forward's own head, except
# for contrastive search, whose candidate row groups share one head after the last group.
OWN_HEADS = {"contrastive": 0, "dola": 1, "constrained_beam": 1}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_hang_up_during_a_forward_ends_the_step_at_the_next_checkpoint(
    engine: LLMEngine, calls: Calls, method: str
) -> None:
    """The client hangs up (another thread) while the third step's forward runs: that step
    does no further chunk (no LM head, no ranking, no constraint advance, no forward),
    reports no token, and the run is gone before the engine has even seen the abort."""
    add(engine, "gone", **METHODS[method])
    run_steps(engine, "gone", 2)
    run = engine._lanes["gone"]
    assert isinstance(run, ClassBRun)
    checks: list[bool] = []
    signalled = run.aborted

    def aborted() -> bool:
        checks.append(signalled())
        return checks[-1]

    run.aborted = aborted
    calls.fire_at = calls.forwards + 1
    calls.on_forward = lambda: engine.signal_abort("gone")
    forwards, lm_heads = calls.forwards, calls.lm_heads
    outputs = engine.step()
    assert calls.forwards == forwards + 1  # the forward that was running when it hung up
    # the forward's own LM head (one call) and nothing after it: DoLa's premature heads and
    # the method's later chunks never ran
    assert calls.lm_heads == lm_heads + OWN_HEADS[method]
    assert checks.count(True) == 1  # the first checkpoint after the hang-up stopped it
    assert all(not out.outputs for out in outputs)  # no token after the hang-up
    assert "gone" not in engine._lanes and not engine.has_unfinished()
    assert engine.abort_request("gone") is False  # nothing left to free
    assert not engine._cancelled


@pytest.mark.parametrize("method", list(METHODS))
def test_max_time_passing_inside_a_step_ends_the_request_with_length(
    engine: LLMEngine, calls: Calls, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """The deadline passes while the third step's forward runs: the request ends at the next
    checkpoint with finish reason length, as generate's MaxTimeCriteria ends it (token
    methods: no further token; beams: the beams of the last whole step are returned)."""
    clock = [1000.0]
    fake_monotonic(monkeypatch, runner_module, clock)
    add(engine, "timed", max_time=5.0, **METHODS[method])
    first = run_steps(engine, "timed", 2)
    calls.fire_at = calls.forwards + 1

    def expire() -> None:
        clock[0] += 10.0

    calls.on_forward = expire
    forwards, lm_heads = calls.forwards, calls.lm_heads
    last = engine.step()
    assert calls.forwards == forwards + 1 and calls.lm_heads == lm_heads + OWN_HEADS[method]
    assert "timed" not in engine._lanes and not engine.has_unfinished()
    (out,) = last
    assert out.finished and out.error is None
    reasons = [s.finish_reason for s in out.outputs]
    assert reasons and all(r == FinishReason.LENGTH for r in reasons)
    if method == "constrained_beam":
        assert first == [] and all(len(s.token_ids) == 2 for s in out.outputs)
    else:  # the two tokens of the whole steps, then the end without a token
        assert [len(o.outputs[0].token_ids) for o in first] == [1, 1]
        assert out.outputs[0].token_ids == []


def test_a_deadline_already_past_still_gives_one_step(engine: LLMEngine) -> None:
    """generate checks max_time after a step, so its first step always completes."""
    add(engine, "tiny", max_time=1e-9, **METHODS["dola"])
    steps = []
    while engine.has_unfinished():
        if outputs := engine.step():  # a chunk that ends mid-step reports nothing
            steps.append(outputs)
    assert [len(s[0].outputs[0].token_ids) for s in steps] == [1, 0]
    assert steps[-1][0].outputs[0].finish_reason == FinishReason.LENGTH


def test_checkpoints_change_no_output(engine: LLMEngine) -> None:
    """A run nobody interrupts gives what it gave without checkpoints (run_method)."""
    model = engine.runner.hf_model
    for options in METHODS.values():
        params = class_b_params(model, len(PROMPT), max_new_tokens=6, **options)
        plain = runner_module.run_method(model, list(PROMPT), params)
        run = ClassBRun(engine.lane_context, list(PROMPT), params, lambda: False)
        outputs = []
        with torch.inference_mode():
            while not run.finished:
                outputs += run.step()
        if len(plain) == 1 and options.get("num_beams") is None:
            assert [t for o in outputs for t in o.token_ids] == plain[0][0]
        else:
            assert [o.token_ids for o in outputs] == [ids for ids, _ in plain]


def test_group_beam_search_stops_before_its_next_forward(engine: LLMEngine, calls: Calls) -> None:
    """Group beam search checks between its steps (its beams are whole only there): a
    hang-up after a step means no further forward."""
    add(engine, "groups", num_beams=4, num_beam_groups=2, diversity_penalty=1.0)
    engine.step()
    engine.step()
    engine.signal_abort("groups")
    forwards = calls.forwards
    outputs = engine.step()
    assert calls.forwards == forwards and all(not out.outputs for out in outputs)
    assert "groups" not in engine._lanes and not engine.has_unfinished()
    engine.abort_request("groups")


class SlowLane:
    """A lane run whose every step takes `seconds` on the fake clock."""

    def __init__(self, clock: list[float], seconds: float) -> None:
        self.clock, self.seconds = clock, seconds
        self.prompt: list[int] = list(PROMPT)
        self.finished = False
        self.diagnostics = None
        self.steps = 0

    def step(self) -> list[Any]:
        self.steps += 1
        self.clock[0] += self.seconds
        return []


def test_lanes_take_about_half_the_engine_while_batch_requests_run(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After lane steps that took L seconds, batch steps run alone for L seconds; with no
    batch request the lanes step every time."""
    from app.engine import engine as engine_module
    from app.options.params import SamplingParams

    clock = [50.0]
    fake_monotonic(monkeypatch, engine_module, clock)
    batch_step = engine._step_batch

    def timed_batch_step() -> list[Any]:
        clock[0] += 0.1
        return batch_step()

    monkeypatch.setattr(engine, "_step_batch", timed_batch_step)
    lane = SlowLane(clock, 0.35)
    engine._lanes["slow"] = lane
    try:
        engine.step()  # nothing in the batch: the lane steps
        assert lane.steps == 1
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        engine.add_request("batch", list(PROMPT), params)
        pattern = []
        for _ in range(12):
            before = lane.steps
            engine.step()
            pattern.append(lane.steps - before)
        # 0.35 s of lane, then 0.1 s batch steps until 0.35 s have passed: a lane step every 4th
        assert pattern == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1], pattern
    finally:
        engine._lanes.pop("slow", None)
        engine.abort_request("batch")
