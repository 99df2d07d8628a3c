"""Every logits option of the contract: the batched Sampler reproduces `model.generate`.

For each option alone, random combinations (hypothesis) and rows with different options in one
batch, a manual loop (model forward + Sampler) must give the tokens of
`torch.manual_seed(s); model.generate(...)` and, step by step, the log-probs of HF's processed
scores (output_scores). Then the engine itself (validation: test_logits_options_validation.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import GPT2LMHeadModel
from transformers.generation import WatermarkingConfig
from transformers.generation.logits_process import InfNanRemoveLogitsProcessor

from app.engine.sample.row import SamplingRow, make_generator
from app.engine.sample.sampler import Sampler
from app.engine.stop import StopChecker
from app.options.checks import ParamValidationError
from app.options.resolve import resolve_sampling_params
from tests.conftest import PEAKY_EOS, PEAKY_POSITIONS, PEAKY_VOCAB
from tests.unit.test_engine import make_engine, run_all

N_POS, VOCAB, EOS = PEAKY_POSITIONS, PEAKY_VOCAB, PEAKY_EOS
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),  # tiny models: threads only add overhead
]


@pytest.fixture(scope="module")
def model(peaky_model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    return peaky_model


def prompt_of(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(20_000 + seed)
    return torch.randint(2, VOCAB, (length,), generator=g).tolist()


def hf_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """Our options as generate() takes them (API-only fields dropped, objects built)."""
    kw = {k: v for k, v in options.items() if k not in ("seed", "top_n_tokens", "bad_words")}
    if kw.get("watermarking_config") is not None:
        kw["watermarking_config"] = WatermarkingConfig(**kw["watermarking_config"])
    return kw


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # under the processed scores
    top: list[list[tuple[int, float]]] = field(default_factory=list)

    def __eq__(self, other: object) -> bool:  # bit-exact, NaN equal to NaN (all -inf rows)
        return isinstance(other, Run) and _key(self) == _key(other)


def _key(run: Run) -> tuple:
    def f(x: float) -> Any:
        return "nan" if math.isnan(x) else x

    return run.tokens, [f(x) for x in run.logprobs], [[(t, f(x)) for t, x in s] for s in run.top]


def hf_run(model: GPT2LMHeadModel, prompt: list[int], options: dict[str, Any]) -> Run:
    ids = torch.tensor([prompt])
    torch.manual_seed(options.get("seed") or 0)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            output_scores=True,
            return_dict_in_generate=True,
            **hf_kwargs(options),
        )
    run = Run(out.sequences[0, len(prompt) :].tolist())
    n = options.get("top_n_tokens", 0)
    for tok, scores in zip(run.tokens, out.scores, strict=True):
        lp = torch.log_softmax(scores[0], dim=-1)
        run.logprobs.append(float(lp[tok]))
        vals, top = torch.topk(lp, n)
        run.top.append(
            [(t, v) for t, v in zip(top.tolist(), vals.tolist(), strict=True) if v != -math.inf]
        )
    return run


def our_run(
    model: GPT2LMHeadModel,
    jobs: list[tuple[list[int], dict[str, Any]]],
    encode: Callable[[str], list[int]] | None = None,
) -> list[Run]:
    """A minimal engine: HF forward per request (own KV cache), one batched Sampler call/step."""
    sampler = Sampler()
    gen_cfg = model.generation_config.to_dict()
    vocab = model.config.vocab_size
    n_pos = model.config.n_positions
    state = []
    for prompt, options in jobs:
        params = resolve_sampling_params(
            options, gen_cfg, n_pos, len(prompt), encode=encode, vocab_size=vocab
        )
        gen = make_generator(params.seed) if params.seed is not None else None
        state.append([params, list(prompt), None, gen, StopChecker(params, len(prompt))])
    runs = [Run() for _ in jobs]
    live = list(range(len(jobs)))
    with torch.no_grad():
        while live:
            logits = []
            for i in live:
                ids, past = state[i][1], state[i][2]
                feed = ids if past is None else ids[-1:]
                out = model(input_ids=torch.tensor([feed]), past_key_values=past, use_cache=True)
                state[i][2] = out.past_key_values
                logits.append(out.logits[0, -1])
            rows = [
                SamplingRow.from_params(state[i][0], state[i][1], len(jobs[i][0]), state[i][3])
                for i in live
            ]
            res = sampler.sample(torch.stack(logits), rows)
            for j, i in enumerate(live):
                tok = res.token_ids[j]
                state[i][1].append(tok)
                runs[i].tokens.append(tok)
                runs[i].logprobs.append(res.processed_logprobs[j])
                runs[i].top.append(
                    list(zip(res.top_token_ids[j], res.top_logprobs[j], strict=True))
                )
            live = [i for i in live if state[i][4].check(state[i][1]) is None]
    return runs


# Each case: a name, and the options as a function of the prompt and the option-free output
# (so that bans and biases hit tokens the model actually picks). `visible`: the option must
# change the tokens or the processed log-probs on these prompts (else the case proves nothing).
Case = Callable[[list[int], list[int]], dict[str, Any]]
CASES: list[tuple[str, Case, bool]] = [
    ("repetition_penalty", lambda p, b: {"repetition_penalty": 1.8}, True),
    ("repetition_penalty<1", lambda p, b: {"repetition_penalty": 0.6}, True),
    ("no_repeat_ngram_size", lambda p, b: {"no_repeat_ngram_size": 2}, True),
    ("no_repeat_ngram_size=1", lambda p, b: {"no_repeat_ngram_size": 1}, True),
    (
        "bad_words_ids",
        lambda p, b: {"bad_words_ids": [[b[0]], [b[1], b[2]], [p[-1], 5, 6], [EOS]]},
        True,
    ),
    (
        "sequence_bias",
        lambda p, b: {
            "sequence_bias": [
                [[b[0]], -5.0],
                [[7], 4.0],
                [[b[0], b[1]], 2.5],
                [[b[0], 9], -1.5],
                [[p[-1], b[0]], 3.0],
                [[7], 1.25],  # a repeated key: last value, first position (as HF's dict)
            ]
        },
        True,
    ),
    ("suppress_tokens", lambda p, b: {"suppress_tokens": [b[0], b[3]]}, True),
    ("begin_suppress_tokens", lambda p, b: {"begin_suppress_tokens": [b[0], EOS]}, True),
    ("forced_eos_token_id", lambda p, b: {"forced_eos_token_id": 7, "max_new_tokens": 8}, True),
    ("forced_eos list", lambda p, b: {"forced_eos_token_id": [7, 9], "max_length": 14}, True),
    ("exponential_decay", lambda p, b: {"exponential_decay_length_penalty": (3, 1.6)}, True),
    ("remove_invalid_values", lambda p, b: {"remove_invalid_values": True}, False),
    (
        "remove_invalid_values + bans",
        lambda p, b: {"remove_invalid_values": True, "suppress_tokens": [b[0]], "top_n_tokens": 5},
        True,
    ),
    ("renormalize_logits", lambda p, b: {"renormalize_logits": True}, False),
    ("watermark lefthash", lambda p, b: {"watermarking_config": {"bias": 3.0}}, True),
    (
        "watermark selfhash",
        lambda p, b: {
            "watermarking_config": {"seeding_scheme": "selfhash", "context_width": 3},
            "max_new_tokens": 6,
        },
        True,
    ),
    ("min_new_tokens", lambda p, b: {"min_new_tokens": 5, "eos_token_id": b[1]}, True),
    ("top_n_tokens", lambda p, b: {"top_n_tokens": 5}, False),
]
SAMPLING_ONLY: list[tuple[str, Case, bool]] = [
    ("min_p", lambda p, b: {"min_p": 0.2}, True),
    ("typical_p", lambda p, b: {"typical_p": 0.6}, True),
    ("epsilon_cutoff", lambda p, b: {"epsilon_cutoff": 0.02}, True),
    ("eta_cutoff", lambda p, b: {"eta_cutoff": 0.05}, True),
    ("top_h", lambda p, b: {"top_h": 0.4}, True),
    (
        "min_p + temperature + top_k 0",
        lambda p, b: {"min_p": 0.1, "temperature": 1.7, "top_k": 0},
        True,
    ),
]
PROMPTS = [prompt_of(0, 6), prompt_of(1, 3)]


def _check_case(model: GPT2LMHeadModel, case: Case, visible: bool, mode: dict[str, Any]) -> None:
    changed = False
    for prompt in PROMPTS:
        base = hf_run(model, prompt, mode)
        options = {**mode, **case(prompt, [*base.tokens, 2, 3, 4])}
        want = hf_run(model, prompt, options)
        (got,) = our_run(model, [(prompt, options)])
        assert got.tokens == want.tokens, options
        assert got.logprobs == want.logprobs, options  # bit-exact processed scores
        if options.get("top_n_tokens"):
            assert got.top == want.top
        changed |= want.tokens != base.tokens or want.logprobs != base.logprobs
    assert changed or not visible, "the option had no effect: the case proves nothing"


GREEDY = {"max_new_tokens": 12}
SAMPLING = {"max_new_tokens": 12, "do_sample": True, "seed": 5}


@pytest.mark.parametrize(("name", "case", "visible"), CASES, ids=[c[0] for c in CASES])
def test_option_alone_greedy(model: GPT2LMHeadModel, name: str, case: Case, visible: bool) -> None:
    _check_case(model, case, visible, GREEDY)


@pytest.mark.parametrize(
    ("name", "case", "visible"), CASES + SAMPLING_ONLY, ids=[c[0] for c in CASES + SAMPLING_ONLY]
)
def test_option_alone_sampling(
    model: GPT2LMHeadModel, name: str, case: Case, visible: bool
) -> None:
    _check_case(model, case, visible, SAMPLING)


def test_forced_bos_on_a_one_token_prompt(model: GPT2LMHeadModel) -> None:
    # HF forces bos only when input_ids has length 1, and then begin_suppress starts one later.
    for options in (
        {"forced_bos_token_id": 9, "max_new_tokens": 6},
        {"forced_bos_token_id": 9, "begin_suppress_tokens": [17, 40], "max_new_tokens": 6},
        {"forced_bos_token_id": 9, "do_sample": True, "seed": 3, "max_new_tokens": 6},
    ):
        for prompt in ([5], [5, 6]):
            want = hf_run(model, prompt, options)
            (got,) = our_run(model, [(prompt, options)])
            assert (got.tokens, got.logprobs) == (want.tokens, want.logprobs), (prompt, options)
    assert our_run(model, [([5], {"forced_bos_token_id": 9})])[0].tokens[0] == 9


def test_greedy_rows_ignore_the_warpers(model: GPT2LMHeadModel) -> None:
    options = {"min_p": 0.5, "typical_p": 0.2, "eta_cutoff": 0.5, "top_h": 0.1, "max_new_tokens": 8}
    prompt = PROMPTS[0]
    (got,) = our_run(model, [(prompt, options)])
    assert (
        got.tokens == hf_run(model, prompt, options).tokens == hf_run(model, prompt, {}).tokens[:8]
    )


# ---------------------------------------------------------------- combinations and batches

_ids = st.lists(st.integers(2, VOCAB - 1), min_size=1, max_size=3)
OPTION_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "repetition_penalty": st.sampled_from([0.5, 1.0, 1.3, 2.0]),
    "no_repeat_ngram_size": st.integers(0, 3),
    "bad_words_ids": st.lists(_ids, min_size=1, max_size=4),
    "sequence_bias": st.lists(
        st.tuples(_ids, st.sampled_from([-4.0, -0.5, 1.5, 6.0])).map(list), min_size=1, max_size=4
    ),
    "suppress_tokens": st.lists(st.integers(0, VOCAB - 1), max_size=6),
    "begin_suppress_tokens": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4),
    "forced_eos_token_id": st.integers(0, VOCAB - 1),
    "exponential_decay_length_penalty": st.tuples(st.integers(0, 4), st.sampled_from([0.7, 1.5])),
    "min_p": st.sampled_from([0.0, 0.05, 0.3]),
    "typical_p": st.sampled_from([0.3, 0.8, 1.0]),
    "epsilon_cutoff": st.sampled_from([0.0, 0.005, 0.05]),
    "eta_cutoff": st.sampled_from([0.0, 0.01, 0.1]),
    "top_h": st.sampled_from([0.2, 0.7, 1.0]),
    "renormalize_logits": st.booleans(),
    "remove_invalid_values": st.booleans(),
    "watermarking_config": st.fixed_dictionaries(
        {"bias": st.sampled_from([1.0, 4.0]), "greenlist_ratio": st.sampled_from([0.1, 0.5])}
    ),
    "temperature": st.sampled_from([0.6, 1.0, 1.4]),
    "top_k": st.sampled_from([0, 5, 50]),
    "top_p": st.sampled_from([0.5, 0.9, 1.0]),
    "min_new_tokens": st.integers(0, 4),
    "top_n_tokens": st.integers(0, 5),
}


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[int], dict[str, Any]]:
    names = draw(st.lists(st.sampled_from(sorted(OPTION_STRATEGIES)), max_size=6, unique=True))
    options = {name: draw(OPTION_STRATEGIES[name]) for name in names}
    options["max_new_tokens"] = draw(st.integers(1, 8))
    if draw(st.booleans()):
        options.update(do_sample=True, seed=draw(st.integers(0, 2**31)))
    prompt = prompt_of(draw(st.integers(0, 50)), draw(st.integers(1, 8)))
    try:
        resolve_sampling_params(options, {}, N_POS, len(prompt), vocab_size=VOCAB)
    except ParamValidationError:
        assume(False)  # e.g. forced tokens inside suppress_tokens: HF raises too
    return prompt, options


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=requests())
def test_random_combinations_match_generate(model: GPT2LMHeadModel, job: tuple) -> None:
    prompt, options = job
    want = hf_run(model, prompt, options)
    (got,) = our_run(model, [(prompt, options)])
    assert got == want


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=st.lists(requests(), min_size=2, max_size=5))
def test_random_batches_equal_each_row_alone(model: GPT2LMHeadModel, jobs: list) -> None:
    batched = our_run(model, jobs)
    for (prompt, options), got in zip(jobs, batched, strict=True):
        assert got == hf_run(model, prompt, options)


def test_rows_with_different_options_batched(model: GPT2LMHeadModel) -> None:
    jobs: list[tuple[list[int], dict[str, Any]]] = [
        (prompt_of(2, 5), {"max_new_tokens": 10}),  # plain greedy: the fast path
        (prompt_of(3, 4), {"max_new_tokens": 10, "repetition_penalty": 1.5, "top_n_tokens": 3}),
        (prompt_of(4, 7), {"do_sample": True, "seed": 1, "min_p": 0.1, "no_repeat_ngram_size": 2}),
        (prompt_of(5, 2), {"do_sample": True, "seed": 2, "top_k": 0, "typical_p": 0.7}),
        (prompt_of(6, 6), {"do_sample": True, "seed": 3}),  # plain seeded sampling
        (prompt_of(7, 3), {"watermarking_config": {}, "sequence_bias": [[[5], 3.0]]}),
        (prompt_of(8, 8), {"do_sample": True, "seed": 4, "eta_cutoff": 0.05, "top_h": 0.9}),
        (prompt_of(9, 4), {"suppress_tokens": [1, 2, 3], "forced_eos_token_id": 4}),
        (prompt_of(10, 5), {"do_sample": True, "renormalize_logits": True, "seed": 8}),
        (prompt_of(11, 3), {"do_sample": True, "epsilon_cutoff": 0.02, "seed": 9}),
    ]
    batched = our_run(model, jobs)
    for (prompt, options), got in zip(jobs, batched, strict=True):
        assert got == hf_run(model, prompt, options), options


def test_logits_generate_kwargs_round_trip(model: GPT2LMHeadModel) -> None:
    # What the engine hands generate itself (e.g. for beam search) must mean the same thing.
    prompt = PROMPTS[0]
    for options in (
        {"repetition_penalty": 1.4, "sequence_bias": {(5,): 2.0, (prompt[-1], 9): -1.5}},
        {"watermarking_config": {"bias": 4}, "no_repeat_ngram_size": 2, "suppress_tokens": []},
        {"do_sample": True, "min_p": 0.1, "typical_p": 0.8, "top_h": 0.9, "eta_cutoff": 0.01},
        {"exponential_decay_length_penalty": [1, 2], "forced_eos_token_id": [7, 8]},
    ):
        params = resolve_sampling_params(options, {"eos_token_id": EOS}, N_POS, len(prompt))
        kwargs = params.logits_generate_kwargs()
        assert "suppress_tokens" not in kwargs and "top_n_tokens" not in kwargs
        mode = {"do_sample": params.do_sample, "max_new_tokens": 10, "seed": 4}
        want = hf_run(model, prompt, {**mode, **options})
        assert hf_run(model, prompt, {**mode, **kwargs}).tokens == want.tokens


def test_plain_rows_report_raw_logprobs_and_skip_the_option_path(model: GPT2LMHeadModel) -> None:
    params = resolve_sampling_params({}, {}, N_POS, 3)
    assert not params.has_logits_options
    row = SamplingRow.from_params(params, [5, 6, 7], 3)
    assert row.options is None
    logits = torch.randn(2, VOCAB, dtype=torch.float64)
    out = Sampler().sample(logits, [row, row])
    assert out.processed_logprobs == out.logprobs and out.top_token_ids == [[], []]
    # an option that only applies when sampling does not take a greedy row off the fast path
    assert not resolve_sampling_params({"min_p": 0.1}, {}, N_POS, 3).has_logits_options


def test_remove_invalid_values_on_non_finite_logits() -> None:
    logits = torch.randn(3, VOCAB)
    logits[0, 5], logits[0, 6], logits[1, 7] = math.inf, -math.inf, math.nan
    params = resolve_sampling_params({"remove_invalid_values": True}, {}, N_POS, 3)
    rows = [SamplingRow.from_params(params, [5, 6, 7], 3) for _ in range(2)]
    rows.append(SamplingRow.from_params(resolve_sampling_params({}, {}, N_POS, 3), [5], 1))
    for row in rows:
        row.top_n = VOCAB  # every token's processed log-prob: the whole processed row
    out = Sampler().sample(logits, rows)
    want = InfNanRemoveLogitsProcessor()(torch.tensor([[5]]), logits[:2].clone())
    for i, expected in enumerate([*want, logits[2]]):
        expected_lp = torch.log_softmax(expected.float(), dim=-1)
        finite = [t for t in range(VOCAB) if math.isfinite(expected_lp[t])]  # top-n drops -inf
        got = dict(zip(out.top_token_ids[i], out.top_logprobs[i], strict=True))
        assert sorted(got) == finite
        assert [got[t] for t in finite] == expected_lp[finite].tolist()
    assert out.token_ids[:2] == [5, int(want[1].argmax())]


# ---------------------------------------------------------------- bad_words as text, engine


def test_bad_words_strings_are_tokenized_without_specials(tiny_model, tiny_tokenizer) -> None:
    def encode(text: str) -> list[int]:
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = encode("대한민국은 민주공화국이다")
    base = hf_run(tiny_model, prompt, {"max_new_tokens": 10}).tokens
    word = tiny_tokenizer.decode(base[:2])
    options = {"max_new_tokens": 10, "bad_words": [word, "국민"], "bad_words_ids": [[base[3]]]}
    params = resolve_sampling_params(
        options, {}, 128, len(prompt), encode=encode, vocab_size=len(tiny_tokenizer)
    )
    assert params.bad_words_ids == [[base[3]], encode(word), encode("국민")]
    (got,) = our_run(tiny_model, [(prompt, options)], encode=encode)
    hf_options = {"max_new_tokens": 10, "bad_words_ids": params.bad_words_ids}
    assert got.tokens == hf_run(tiny_model, prompt, hf_options).tokens != base


def test_engine_busy_batch_with_mixed_options(tiny_model, tiny_tokenizer) -> None:
    texts = ["대한민국은 민주공화국이다", "모든 국민은", "제1조 " * 6, "국회는", "법률"]
    prompts = [tiny_tokenizer(t)["input_ids"] for t in texts]
    options: list[dict[str, Any]] = [
        {"max_new_tokens": 12, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
        {"max_new_tokens": 10, "do_sample": True, "seed": 3, "min_p": 0.05, "top_k": 0},
        {"max_new_tokens": 9, "suppress_tokens": [4, 5, 6], "watermarking_config": {"bias": 5.0}},
        {"max_new_tokens": 11, "do_sample": True, "seed": 5, "typical_p": 0.9, "top_h": 0.8},
        {"max_new_tokens": 8},  # plain greedy
        {"max_new_tokens": 7, "do_sample": True, "seed": 7},  # plain seeded sampling
        {"max_new_tokens": 10, "sequence_bias": [[[10], 2.0]], "forced_eos_token_id": 3},
    ]
    jobs = [(prompts[i % len(prompts)], o) for i, o in enumerate(options)]
    got = run_all(make_engine(tiny_model, tiny_tokenizer), jobs)
    for i, (prompt, opts) in enumerate(jobs):
        assert got[f"r{i}"] == hf_run(tiny_model, prompt, opts).tokens, opts
