"""OpenAI's presence / frequency penalties, as vLLM applies them (`apply_penalties` in
vllm/model_executor/layers/utils.py), over each sequence's generated tokens only:

    logits -= frequency_penalty * count_in_output
    logits -= presence_penalty * (count_in_output > 0)

right after HF's RepetitionPenaltyLogitsProcessor (vLLM: repetition, frequency, presence, after
its logit_bias; temperature and top-k / top-p come later). Checked against values worked out
by hand, vLLM's dense form, and a plain Python loop over GPT2LMHeadModel (float64 model,
float32 scores as generate's `_sample`) that applies the formula and then HF's own processors;
the engine must give that loop's tokens, greedy and seeded, with n > 1, in a busy batch and
with prompt-lookup drafts. Validation: the range, and the lanes that cannot apply them (422).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from app.engine.engine import LLMEngine
from app.engine.sample.logits_processors import apply_processors
from app.engine.sample.row import SamplingRow
from app.engine.sample.sampler import Sampler
from app.options.checks import ParamValidationError
from app.options.params import SamplingParams
from app.options.resolve import ModelLimits, resolve_request, resolve_sampling_params
from tests.conftest import PEAKY_VOCAB
from tests.unit.test_engine import make_engine

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]
PENALTIES = ("frequency_penalty", "presence_penalty")


def processed(scores: list[list[float]], rows: list[SamplingRow]) -> torch.Tensor:
    """apply_processors on a float32 batch; the rows' options as the sampler gives them."""
    out = torch.tensor(scores, dtype=torch.float32)
    extra = [(i, r, r.options) for i, r in enumerate(rows) if r.options is not None]
    apply_processors(out, rows, extra, [False] * len(rows))
    return out


def row(token_ids: list[int], prompt_len: int, **options: Any) -> SamplingRow:
    return SamplingRow.from_params(SamplingParams(**options), token_ids, prompt_len)


# -- the formula, by hand -----------------------------------------------------------------


def test_hand_computed_values() -> None:
    """Prompt [0, 1, 2], output [2, 2, 4]: token 2 twice, token 4 once; the prompt's 0 and 1
    (and 2's prompt occurrence) do not count."""
    scores = [[1.0, 2.0, 3.0, -1.0, 0.5, 4.0]]
    out = processed(
        scores, [row([0, 1, 2, 2, 2, 4], 3, frequency_penalty=0.5, presence_penalty=0.25)]
    )
    #                       0    1    2: 3 - 0.5*2 - 0.25   3     4: 0.5 - 0.5 - 0.25   5
    assert out[0].tolist() == [1.0, 2.0, 1.75, -1.0, -0.25, 4.0]


def test_negative_penalties_raise_repeated_tokens() -> None:
    out = processed(
        [[0.0, 0.0, 0.0]], [row([0, 1, 1, 1], 1, frequency_penalty=-2.0, presence_penalty=-1.0)]
    )
    assert out[0].tolist() == [0.0, 7.0, 0.0]  # 0 - (-2 * 3) - (-1)


def test_no_output_yet_changes_nothing() -> None:
    scores = [[0.3, -0.7, 1.1]]
    out = processed(scores, [row([0, 1, 2], 3, frequency_penalty=2.0, presence_penalty=2.0)])
    assert out.tolist() == torch.tensor(scores, dtype=torch.float32).tolist()


def test_after_repetition_penalty_in_vllms_order() -> None:
    """HF's repetition penalty (prompt and output, divide / multiply) first, then ours."""
    out = processed(
        [[3.0, -2.0, 1.0, 5.0]],
        [row([0, 1, 1, 2], 2, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0)],
    )
    # prompt [0, 1], output [1, 2]. 0: prompt only, 3 / 2; 1: -2 * 2 - 0.5 * 1 - 1 = -5.5;
    # 2: 1 / 2 - 0.5 - 1 = -1.0; 3: untouched.
    assert out[0].tolist() == [1.5, -5.5, -1.0, 5.0]


def test_sequence_bias_comes_first() -> None:
    """logit_bias / sequence_bias before the penalties (vLLM: logit_bias, then penalties);
    the subtraction commutes with the bias, so the value shows the order is harmless too."""
    out = processed(
        [[0.0, 0.0]], [row([0, 1], 1, sequence_bias=[[[1], 4.0]], frequency_penalty=1.5)]
    )
    assert out[0].tolist() == [0.0, 2.5]


def test_banned_tokens_stay_banned() -> None:
    out = processed(
        [[0.0, 0.0, 0.0]], [row([0, 2, 2], 1, suppress_tokens=[2], frequency_penalty=-2.0)]
    )
    assert out[0].tolist() == [0.0, 0.0, float("-inf")]


# -- batched: each row its own penalties and its own output --------------------------------


def vllm_dense(
    scores: torch.Tensor, outputs: list[list[int]], freq: list[float], pres: list[float]
) -> torch.Tensor:
    """vLLM's apply_penalties (its frequency / presence part), dense over the vocabulary."""
    num, vocab = scores.shape
    counts = torch.zeros(num, vocab + 1, dtype=torch.long)
    padded = torch.full((num, max(map(len, outputs), default=0)), vocab, dtype=torch.long)
    for i, out in enumerate(outputs):
        padded[i, : len(out)] = torch.tensor(out, dtype=torch.long)
    counts.scatter_add_(1, padded, torch.ones_like(padded))
    counts = counts[:, :vocab]
    logits = scores.clone()
    logits -= torch.tensor(freq, dtype=logits.dtype).unsqueeze(dim=1) * counts
    logits -= torch.tensor(pres, dtype=logits.dtype).unsqueeze(dim=1) * (counts > 0)
    return logits


def test_batched_rows_equal_vllms_dense_form_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(3)
    vocab, prompt_len = 50, 4
    scores = torch.randn(6, vocab, generator=gen, dtype=torch.float32) * 4
    settings = [(0.7, 0.3), (-1.3, 2.0), (0.0, 0.0), (2.0, -2.0), (0.1, 0.0), (0.0, 1.1)]
    outputs = [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in (9, 3, 7, 0, 20, 5)]
    rows = [
        row([5] * prompt_len + out, prompt_len, frequency_penalty=f, presence_penalty=p)
        for out, (f, p) in zip(outputs, settings, strict=True)
    ]
    got = processed(scores.tolist(), rows)
    want = vllm_dense(scores, outputs, [f for f, _ in settings], [p for _, p in settings])
    assert torch.equal(got, want)


def test_penalised_rows_leave_other_rows_alone() -> None:
    scores = [[0.5, 1.5, -0.5], [0.5, 1.5, -0.5]]
    out = processed(scores, [row([0, 1, 1], 1, presence_penalty=1.0), row([0, 1, 1], 1)])
    assert out[1].tolist() == scores[1] and out[0].tolist() == [0.5, 0.5, -0.5]


# -- a plain reference loop against the engine -----------------------------------------------


def reference(
    model: GPT2LMHeadModel, prompt: list[int], options: dict[str, Any]
) -> list[list[int]]:
    """generate's `_sample` written out for these options: float32 scores of the float64
    model, HF's repetition penalty, the penalty formula (vLLM's dense form), HF's
    no-repeat-ngram, then (sampling) HF's warpers, softmax and multinomial on the default
    generator after torch.manual_seed(seed); n sequences as one batch. Never stops early
    (the jobs set ignore_eos)."""
    n = options.get("num_return_sequences", 1)
    before = LogitsProcessorList()
    if options.get("repetition_penalty", 1.0) != 1.0:
        before.append(RepetitionPenaltyLogitsProcessor(options["repetition_penalty"]))
    after = LogitsProcessorList()
    if options.get("no_repeat_ngram_size"):
        after.append(NoRepeatNGramLogitsProcessor(options["no_repeat_ngram_size"]))
    sampling = options.get("do_sample", False)
    if sampling:
        if options.get("temperature", 1.0) != 1.0:
            after.append(TemperatureLogitsWarper(options["temperature"]))
        if options.get("top_k", 50) != 0:  # generate skips top-k at 0
            after.append(TopKLogitsWarper(options.get("top_k", 50)))
        if options.get("top_p", 1.0) < 1.0:
            after.append(TopPLogitsWarper(options["top_p"]))
    freq = [options.get("frequency_penalty", 0.0)] * n
    pres = [options.get("presence_penalty", 0.0)] * n
    torch.manual_seed(options.get("seed", 0))
    ids = torch.tensor([prompt] * n)
    with torch.no_grad():
        for _ in range(options["max_new_tokens"]):
            logits = model(input_ids=ids).logits[:, -1, :].to(torch.float32)
            scores = before(ids, logits)
            outputs = [r[len(prompt) :].tolist() for r in ids]
            scores = vllm_dense(scores, outputs, freq, pres)
            scores = after(ids, scores)
            if sampling:
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
            else:
                token = torch.argmax(scores, dim=-1)
            ids = torch.cat([ids, token[:, None]], dim=-1)
    return [r[len(prompt) :].tolist() for r in ids]


def engine_outputs(
    engine: Any, jobs: list[tuple[list[int], dict[str, Any]]]
) -> list[list[list[int]]]:
    """Every job in one engine; the ids of each returned sequence, by index."""
    n_pos = engine.runner.config.n_positions
    for i, (prompt, options) in enumerate(jobs):
        engine.add_request(
            f"r{i}", prompt, resolve_sampling_params(options, {}, n_pos, len(prompt))
        )
    tokens: dict[str, dict[int, list[int]]] = {f"r{i}": {} for i in range(len(jobs))}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for seq in out.outputs:
                tokens[out.request_id].setdefault(seq.index, []).extend(seq.token_ids)
        engine.check_integrity()
    return [[tokens[f"r{i}"][k] for k in sorted(tokens[f"r{i}"])] for i in range(len(jobs))]


BASE = {"max_new_tokens": 20, "ignore_eos": True}
JOBS: list[dict[str, Any]] = [
    {"frequency_penalty": 0.8, "presence_penalty": 0.5},
    {"do_sample": True, "seed": 2, "frequency_penalty": -1.5, "presence_penalty": -0.5},
    {"do_sample": True, "seed": 11, "frequency_penalty": 1.2, "top_k": 20},
    {"do_sample": True, "seed": 5, "presence_penalty": 2.0, "temperature": 0.7, "top_p": 0.9},
    {
        "do_sample": True,
        "seed": 7,
        "num_return_sequences": 3,
        "frequency_penalty": 1.0,
        "presence_penalty": 0.4,
        "repetition_penalty": 1.3,
    },
    {"frequency_penalty": 0.6, "repetition_penalty": 0.8, "no_repeat_ngram_size": 3},
    {"do_sample": True, "seed": 3},  # no penalty, in the same batch
]


@pytest.fixture(scope="module")
def model(peaky_model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Peaky (its tokens repeat, so the penalties change what is chosen), float64."""
    return peaky_model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(21)
    return [torch.randint(2, PEAKY_VOCAB, (k,), generator=gen).tolist() for k in (9, 3, 6, 12)]


def test_reference_loop_sees_the_penalties(model: GPT2LMHeadModel, prompts: list) -> None:
    """Each penalised job's reference differs from the same job without penalties (else the
    engine comparison below would prove nothing)."""
    for k, options in enumerate(JOBS[:-1]):
        prompt = prompts[k % len(prompts)]
        plain = {n: v for n, v in options.items() if n not in PENALTIES}
        assert reference(model, prompt, {**BASE, **options}) != reference(
            model, prompt, {**BASE, **plain}
        ), options


def test_engine_equals_the_reference_loop(
    model: GPT2LMHeadModel, tiny_tokenizer: Any, prompts: list
) -> None:
    """Greedy and seeded, n = 3 siblings (each counts its own output), with repetition
    penalty and no-repeat-ngram around them, all in one busy batch."""
    jobs = [(prompts[k % len(prompts)], {**BASE, **o}) for k, o in enumerate(JOBS)]
    got = engine_outputs(make_engine(model, tiny_tokenizer), jobs)
    for (prompt, options), out in zip(jobs, got, strict=True):
        assert out == reference(model, prompt, options), options


def test_prompt_lookup_verifies_with_the_same_penalties(
    model: GPT2LMHeadModel, tiny_tokenizer: Any, prompts: list
) -> None:
    """Drafts are verified position by position with each position's own counts: the output
    equals the reference, and drafts were accepted (the negative penalty makes repeats)."""
    jobs = [
        (
            prompts[k % len(prompts)],
            {**BASE, "max_new_tokens": 24, **o, "prompt_lookup_num_tokens": 3},
        )
        for k, o in enumerate(JOBS)
        if o.get("num_return_sequences", 1) == 1
    ]
    engine = make_engine(model, tiny_tokenizer)
    got = engine_outputs(engine, jobs)
    for (prompt, options), out in zip(jobs, got, strict=True):
        assert out == reference(model, prompt, options), options
    assert engine.stats()["spec_accepted_tokens"] > 0


def test_draft_model_verifies_with_the_same_penalties(
    model: GPT2LMHeadModel, tiny_tokenizer: Any, prompts: list
) -> None:
    """--draft-model (here the model itself, drafting greedily without penalties): every draft
    position is verified with its own counts, so the output is the reference's."""
    jobs = [
        (prompts[k % len(prompts)], {**BASE, **o})
        for k, o in enumerate(JOBS)
        if o.get("num_return_sequences", 1) == 1
    ]
    config = make_engine(model, tiny_tokenizer).config
    engine = LLMEngine(model, tiny_tokenizer, config, draft_model=copy.deepcopy(model))
    got = engine_outputs(engine, jobs)
    for (prompt, options), out in zip(jobs, got, strict=True):
        assert out == reference(model, prompt, options), options
    stats = engine.stats()
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # some rejected too


def test_sampler_reports_log_probs_of_the_penalised_scores() -> None:
    """The token's log-prob is taken from the penalised distribution (what it was chosen from)."""
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float32)
    r = row([0, 0, 0], 1, frequency_penalty=2.0)  # token 0 twice in the output: 2 - 4 = -2
    res = Sampler().sample(logits, [r])
    assert res.token_ids == [1]
    want = torch.log_softmax(torch.tensor([-2.0, 1.0, 0.0]), dim=-1)[1].item()
    assert res.processed_logprobs[0] == pytest.approx(want, abs=1e-6)


# -- validation -------------------------------------------------------------------------------


def resolve(options: dict[str, Any]) -> SamplingParams:
    return resolve_sampling_params(options, {}, 1024, 4)


@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("value", [-2.5, 2.01, float("nan")])
def test_out_of_range_names_field_and_range(name: str, value: float) -> None:
    with pytest.raises(ParamValidationError) as err:
        resolve({name: value})
    assert err.value.field == name
    assert "[-2, 2]" in err.value.message or "finite" in err.value.message


@pytest.mark.parametrize("name", PENALTIES)
def test_bounds_and_zero(name: str) -> None:
    assert getattr(resolve({name: -2}), name) == -2.0
    assert getattr(resolve({name: 2.0}), name) == 2.0
    plain = resolve({name: 0})
    assert getattr(plain, name) == 0.0 and not plain.has_logits_options


@pytest.mark.parametrize("name", PENALTIES)
def test_beam_search_is_refused(name: str) -> None:
    with pytest.raises(ParamValidationError) as err:
        resolve({name: 0.5, "num_beams": 2})
    assert err.value.field == name and "beam search" in err.value.message
    assert resolve({name: 0.0, "num_beams": 2}).num_beams == 2  # 0 is off


LIMITS = ModelLimits(generation_defaults={}, max_total_tokens=1024, vocab_size=1000, num_layers=2)


@pytest.mark.parametrize(
    ("lane", "words"),
    [
        ({"penalty_alpha": 0.6, "top_k": 4}, "class-B"),
        ({"dola_layers": "low"}, "class-B"),
        ({"output_attentions": True}, "exact lane"),
    ],
)
def test_lanes_without_the_penalty_refuse_it(lane: dict[str, Any], words: str) -> None:
    with pytest.raises(ParamValidationError) as err:
        resolve_request(
            {"frequency_penalty": 0.5, **lane}, LIMITS, 4, encode=lambda t: [5], exact_lane=True
        )
    assert err.value.field == "frequency_penalty" and words in err.value.message
