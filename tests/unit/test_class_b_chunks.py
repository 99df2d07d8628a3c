"""A long class-B step runs in bounded chunks, one per engine step (issue #21 fairness: a small
request arriving mid-step waits for one chunk, not for the rest of the step). Counted in model
rows x positions, LM heads and constraint advances per `ClassBRun.step()` call (what the
engine runs per engine step), never in time; the chunked run gives the unchunked tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from app.engine.engine import EngineConfig, LLMEngine
from app.engine.lanes.class_b import contrastive as contrastive_module
from app.engine.lanes.class_b import dola as dola_module
from app.engine.lanes.class_b.constraints import ConstraintListState
from app.engine.lanes.class_b.contrastive import row_groups
from app.engine.lanes.class_b.runner import ClassBRun, run_method
from app.engine.outputs import SequenceOutput
from tests.unit.class_b_helpers import class_b_params

PROMPT = [5 + (i * 7) % 40 for i in range(30)]


@pytest.fixture(scope="module")
def engine(
    tiny_model: GPT2LMHeadModel, tiny_tokenizer: PreTrainedTokenizerFast, one_thread: None
) -> Iterator[LLMEngine]:
    yield LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(num_blocks=32, max_num_seqs=8))


class PerStep:
    """What each `run.step()` call did: candidate rows x cached positions per transformer
    forward, LM-head calls, constraint advances."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[dict[str, list[int]]] = []
        self.handles = [
            model.transformer.register_forward_pre_hook(self._forward, with_kwargs=True),
            model.get_output_embeddings().register_forward_hook(self._lm_head),
        ]
        advance = ConstraintListState.advance

        def counted_advance(state: ConstraintListState) -> Any:
            self._now()["advances"].append(1)
            return advance(state)

        monkeypatch.setattr(ConstraintListState, "advance", counted_advance)

    def _now(self) -> dict[str, list[int]]:
        return self.steps[-1]

    def _forward(self, _module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        cached = 0 if cache is None else cache.get_seq_length()
        self._now()["row_positions"].append(ids.shape[0] * max(cached, ids.shape[1]))

    def _lm_head(self, *_: Any) -> None:
        self._now()["lm_heads"].append(1)

    def run(self, run: ClassBRun) -> list[SequenceOutput]:
        outputs: list[SequenceOutput] = []
        with torch.inference_mode():
            while not run.finished:
                self.steps.append({"row_positions": [], "lm_heads": [], "advances": []})
                outputs += run.step()
        for handle in self.handles:
            handle.remove()
        return outputs


def test_row_groups_cover_the_candidates_in_bounded_even_groups() -> None:
    assert row_groups(16, 1024) == [range(i, i + 2) for i in range(0, 16, 2)]
    assert row_groups(16, 100) == [range(16)]  # within the bound: the unsplit forward
    assert row_groups(5, 2048) == [range(0, 2), range(2, 5)]  # never a group of one row
    for top_k in range(1, 20):
        for positions in (1, 100, 600, 1000, 3000):
            groups = row_groups(top_k, positions)
            assert [r for g in groups for r in g] == list(range(top_k))
            assert all(len(g) >= min(2, top_k) for g in groups)
            if len(groups) > 1:  # bounded unless a group is at its two-row minimum
                bound = max(2, contrastive_module.CHUNK_ROW_POSITIONS // positions)
                assert all(len(g) <= bound + 1 for g in groups)


def test_contrastive_runs_one_row_group_per_engine_step(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = engine.runner.hf_model
    params = class_b_params(model, len(PROMPT), penalty_alpha=0.6, top_k=8, max_new_tokens=6)
    whole = run_method(model, list(PROMPT), params)  # one group per step (the default bound)
    bound = 2 * (len(PROMPT) + 6)  # two candidate rows per group at every step
    monkeypatch.setattr(contrastive_module, "CHUNK_ROW_POSITIONS", bound)
    per_step = PerStep(model, monkeypatch)
    outputs = per_step.run(ClassBRun(engine.lane_context, list(PROMPT), params))
    first, *rest = per_step.steps
    assert first["row_positions"] == [len(PROMPT), 2 * len(PROMPT)]  # prefill, one group
    assert all(len(s["row_positions"]) == 1 for s in rest)  # one forward per engine step
    assert max(n for s in rest for n in s["row_positions"]) <= bound
    assert len(per_step.steps) == 6 * 4  # 4 groups of 2 rows per token
    assert [t for o in outputs for t in o.token_ids] == whole[0][0]


def test_dola_runs_a_bounded_number_of_lm_heads_per_engine_step(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = engine.runner.hf_model
    layers = [0, 1, 0, 1, 1]  # this model's two premature layers, repeats computed once
    params = class_b_params(model, len(PROMPT), dola_layers=layers, max_new_tokens=5)
    whole = run_method(model, list(PROMPT), params)
    monkeypatch.setattr(dola_module, "CHUNK_HEAD_LOGITS", model.config.vocab_size)  # one head
    per_step = PerStep(model, monkeypatch)
    outputs = per_step.run(ClassBRun(engine.lane_context, list(PROMPT), params))
    # per token: the forward with the final layer's head, then one premature head per step
    assert [len(s["lm_heads"]) for s in per_step.steps] == [1, 1, 1] * 5
    assert [len(s["row_positions"]) for s in per_step.steps] == [1, 0, 0] * 5
    assert [t for o in outputs for t in o.token_ids] == whole[0][0]


def test_constrained_beam_advances_one_beam_per_engine_step(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = engine.runner.hf_model
    forced = [[60], [[71, 72], [73]]]  # not in the prompt: every beam has constraints to advance
    options = {"num_beams": 4, "force_words_ids": forced, "max_new_tokens": 5}
    params = class_b_params(model, len(PROMPT), **options)
    whole = run_method(model, list(PROMPT), params)
    per_step = PerStep(model, monkeypatch)
    outputs = per_step.run(ClassBRun(engine.lane_context, list(PROMPT), params))
    assert max(len(s["advances"]) for s in per_step.steps) == 1
    assert sum(len(s["advances"]) for s in per_step.steps) > 4  # several steps, beams
    assert max(len(s["row_positions"]) for s in per_step.steps) == 1
    assert [o.token_ids for o in outputs] == [ids for ids, _ in whole]
