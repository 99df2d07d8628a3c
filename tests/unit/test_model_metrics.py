"""Per-model request gauges (kogpt_model_requests_running / _waiting): read from the
scheduler's queues by each request's full model at scrape time, labelled with the model's
name (the default model: the metrics' own), the last counts kept when a read fails."""

from __future__ import annotations

import copy

import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from app.engine.async_engine import AsyncEngine
from app.engine.engine import EngineConfig, LLMEngine
from app.metrics import ServerMetrics
from app.options.resolve import resolve_sampling_params

pytestmark = pytest.mark.usefixtures("one_thread")


def gauges(metrics: ServerMetrics, name: str) -> dict[str, float]:
    text = metrics.render().decode()
    return {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_requests_of_each_model(
    tiny_model: GPT2LMHeadModel, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    engine = LLMEngine(
        tiny_model,
        tiny_tokenizer,
        EngineConfig(num_blocks=64, block_size=4, max_num_seqs=2),
        more_models={"other": copy.deepcopy(tiny_model)},
    )
    metrics = ServerMetrics("base")
    metrics.bind_engine(AsyncEngine(engine))
    prompt = tiny_tokenizer("대한민국은")["input_ids"]
    for i, model in enumerate([None, "other", "other"]):
        params = resolve_sampling_params({"max_new_tokens": 4}, {}, 128, len(prompt))
        params.model_name = model
        engine.add_request(f"r{i}", prompt, params)
    assert engine.requests_by_model() == ([0, 0], [1, 2])
    assert gauges(metrics, "kogpt_model_requests_waiting") == {"base": 1, "other": 2}
    assert gauges(metrics, "kogpt_model_requests_running") == {"base": 0, "other": 0}

    engine.step()  # two seats: the models' waiting requests are admitted in turn
    assert gauges(metrics, "kogpt_model_requests_running") == {"base": 1, "other": 1}
    assert gauges(metrics, "kogpt_model_requests_waiting") == {"base": 0, "other": 1}
    # The server-wide gauges stay one series, the default model's.
    assert gauges(metrics, "kogpt_requests_running") == {"base": 2}
    assert gauges(metrics, "kogpt_requests_waiting") == {"base": 1}

    def changing() -> tuple[list[int], list[int]]:
        raise RuntimeError("deque mutated during iteration")

    engine.requests_by_model = changing  # type: ignore[method-assign]
    assert gauges(metrics, "kogpt_model_requests_running") == {"base": 1, "other": 1}
    del engine.requests_by_model
    while engine.has_unfinished():
        engine.step()
    assert gauges(metrics, "kogpt_model_requests_running") == {"base": 0, "other": 0}
    assert gauges(metrics, "kogpt_model_requests_waiting") == {"base": 0, "other": 0}
