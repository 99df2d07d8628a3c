"""Device busy / idle time per step (app/engine/step_timing.py) and its Prometheus series.

On CPU the forward is synchronous: busy is its wall time and idle the host time between
forwards, counted only while requests were running before the step.
"""

from __future__ import annotations

import pytest
import torch

from app.engine.async_engine import AsyncEngine
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.step_timing import StepTimer, StepTiming
from app.metrics import ServerMetrics
from app.options.resolve import resolve_sampling_params

pytestmark = pytest.mark.usefixtures("one_thread")


def sample_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


def test_idle_counts_only_between_forwards_of_running_requests() -> None:
    timer = StepTimer(torch.device("cpu"))
    seen: list[StepTiming] = []
    timer.observers.append(seen.append)
    timer.begin_step(continuing=False)  # the first request's first step
    timer.forward_started()
    timer.forward_finished()
    timer.begin_step(continuing=True)
    timer.forward_started()
    timer.forward_finished()
    timer.begin_step(continuing=False)  # the engine was empty: the gap is not idleness
    timer.forward_started()
    timer.forward_finished()
    assert [t.device_idle is None for t in seen] == [True, False, True]
    assert all(t.device_busy >= 0 for t in seen)
    assert seen[1].device_idle == seen[1].host and seen[1].device_idle is not None
    assert timer.num_forwards == 3
    assert timer.busy_seconds == pytest.approx(sum(t.device_busy for t in seen))
    assert timer.idle_seconds == seen[1].device_idle
    assert 0 <= timer.idle_ratio < 1


def test_empty_timer_has_zero_ratio() -> None:
    assert StepTimer(torch.device("cpu")).idle_ratio == 0.0


def test_engine_steps_are_timed_and_exported(tiny_model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(num_blocks=64, block_size=4))
    metrics = ServerMetrics("tiny")
    metrics.bind_engine(AsyncEngine(engine))
    seen: list[StepTiming] = []
    engine.runner.step_timer.observers.append(seen.append)
    forwards = []
    engine.step_observers.append(forwards.append)
    for i, text in enumerate(["대한민국은", "모든 국민은 법 앞에"]):
        prompt = tiny_tokenizer(text)["input_ids"]
        params = resolve_sampling_params({"max_new_tokens": 6}, {}, 128, len(prompt))
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished():
        engine.step()
    assert len(seen) == len(forwards) == engine.runner.step_timer.num_forwards > 1
    assert seen[0].device_idle is None  # nothing ran before the first step
    assert all(t.device_idle is not None for t in seen[1:])  # requests ran throughout
    stats = engine.stats()
    assert stats["device_busy_seconds"] == pytest.approx(sum(t.device_busy for t in seen))
    assert stats["device_idle_seconds"] == pytest.approx(sum(t.device_idle or 0 for t in seen))
    assert 0 < stats["device_idle_ratio"] < 1

    text = metrics.render().decode()
    assert sample_value(text, "kogpt_step_device_busy_seconds_count") == len(seen)
    assert sample_value(text, "kogpt_step_device_idle_seconds_count") == len(seen) - 1
    assert sample_value(text, "kogpt_step_host_seconds_count") == len(seen) - 1
    assert sample_value(text, "kogpt_device_idle_ratio") == pytest.approx(
        stats["device_idle_ratio"]
    )
    assert sample_value(text, "kogpt_device_busy_seconds_total") > 0
