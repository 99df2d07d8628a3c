"""ClassBRun: a class-B request as the engine thread runs it, one step per call, reported as
engine-shaped SequenceOutputs (stop checks, detokenized text, logprobs, finish reasons)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from app.engine.core.request import FinishReason
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.lanes.class_b.runner import ClassBRun, rows_error, run_method
from app.engine.outputs import SequenceOutput
from tests.unit.class_b_helpers import class_b_params

PROMPT = [5, 9, 14, 22, 9]


@pytest.fixture(scope="module")
def engine(
    tiny_model: GPT2LMHeadModel, tiny_tokenizer: PreTrainedTokenizerFast, one_thread: None
) -> Iterator[LLMEngine]:
    yield LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(num_blocks=32, max_num_seqs=8))


def run_all(engine: LLMEngine, **options: Any) -> list[list[SequenceOutput]]:
    params = class_b_params(engine.runner.hf_model, 5, **options)
    run = ClassBRun(engine.lane_context, list(PROMPT), params)
    steps = []
    while not run.finished:
        steps.append(run.step())
    return steps


def test_token_methods_report_a_token_per_step(engine: LLMEngine) -> None:
    options = {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 6, "top_n_tokens": 3}
    steps = run_all(engine, **options)
    assert [len(s) for s in steps] == [1] * 6
    outputs = [s[0] for s in steps]
    tokens = [t for o in outputs for t in o.token_ids]
    model = engine.runner.hf_model
    assert tokens == run_method(model, PROMPT, class_b_params(model, 5, **options))[0][0]
    assert [o.finish_reason for o in outputs] == [None] * 5 + [FinishReason.LENGTH]
    assert "".join(o.text for o in outputs) == engine.tokenizer.decode(tokens)
    for o in outputs:
        assert o.logprobs[0] <= 0 and len(o.top_token_ids[0]) == 3
        assert o.top_logprobs[0] == sorted(o.top_logprobs[0], reverse=True)


def test_beam_methods_report_their_sequences_at_the_end(engine: LLMEngine) -> None:
    options = {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0,
               "num_return_sequences": 2, "max_new_tokens": 5}  # fmt: skip
    steps = run_all(engine, **options)
    assert all(s == [] for s in steps[:-1]) and len(steps) == 5
    last = steps[-1]
    assert [o.index for o in last] == [0, 1]
    assert all(len(o.token_ids) == 5 and o.finish_reason == FinishReason.LENGTH for o in last)
    assert last[0].score is not None and last[1].score is not None
    assert last[0].score >= last[1].score


def test_a_stop_from_generate_alone_ends_with_length(engine: LLMEngine) -> None:
    """max_time stops the method inside transformers' criteria: the last step reports no
    token, only the finish reason."""
    steps = run_all(engine, penalty_alpha=0.6, top_k=4, max_new_tokens=20, max_time=1e-9)
    assert [len(s[0].token_ids) for s in steps] == [1, 0]
    assert steps[-1][0].finish_reason == FinishReason.LENGTH


def test_rows_error_names_the_field(engine: LLMEngine) -> None:
    model = engine.runner.hf_model
    contrastive = class_b_params(model, 5, penalty_alpha=0.5, top_k=9)
    assert rows_error(contrastive, 8) is not None and "`top_k` (9)" in str(
        rows_error(contrastive, 8)
    )
    assert rows_error(contrastive, 9) is None
    beams = class_b_params(model, 5, num_beams=4, force_words_ids=[[7]])
    assert rows_error(beams, 3) is not None and rows_error(beams, 4) is None
