"""Sampler + SamplingParams against transformers' own `model.generate`, token for token."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel

from app.engine.core.request import FinishReason
from app.engine.sample.row import SamplingRow, make_generator
from app.engine.sample.sampler import Sampler
from app.engine.stop import StopChecker
from app.options.checks import ParamValidationError
from app.options.params import SamplingParams
from app.options.resolve import resolve_sampling_params
from tests.conftest import PEAKY_EOS as EOS
from tests.conftest import PEAKY_POSITIONS as N_POS

# generate() warns about its default max_length and sampling flags; the behaviour is the point.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),  # tiny models: threads only add overhead
]


@pytest.fixture(scope="module")
def model(peaky_model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    return peaky_model


def prompt_of(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(2, 300, (length,), generator=g).tolist()


def hf_generate(model: GPT2LMHeadModel, prompt: list[int], seed: int, **kw: Any) -> list[int]:
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    return out[0, len(prompt) :].tolist()


@dataclass
class Req:
    prompt: list[int]
    options: dict[str, Any]
    seed: int | None
    params: SamplingParams = field(init=False)
    ids: list[int] = field(init=False)
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: FinishReason | None = None


def engine_generate(
    model: GPT2LMHeadModel, reqs: list[Req], sampler: Sampler | None = None
) -> list[Req]:
    """A minimal engine loop: HF forward per request (own KV cache), one batched sample/step."""
    sampler = sampler or Sampler()
    gen_cfg = model.generation_config.to_dict()
    state: dict[int, dict[str, Any]] = {}
    for i, req in enumerate(reqs):
        opts = dict(req.options, seed=req.seed)
        req.params = resolve_sampling_params(opts, gen_cfg, N_POS, len(req.prompt))
        req.ids = list(req.prompt)
        state[i] = {
            "past": None,
            "gen": None if req.seed is None else make_generator(req.seed),
            "stop": StopChecker(req.params, len(req.prompt)),
        }
    live = list(range(len(reqs)))
    with torch.no_grad():
        while live:
            rows_logits = []
            for i in live:
                st, req = state[i], reqs[i]
                feed = req.ids if st["past"] is None else req.ids[-1:]
                out = model(
                    input_ids=torch.tensor([feed]),
                    past_key_values=st["past"],
                    use_cache=True,
                    logits_to_keep=1,
                )
                st["past"] = out.past_key_values
                rows_logits.append(out.logits[0, -1])
            rows = [
                SamplingRow.from_params(
                    reqs[i].params, reqs[i].ids, len(reqs[i].prompt), state[i]["gen"]
                )
                for i in live
            ]
            result = sampler.sample(torch.stack(rows_logits), rows)
            for i, tok, lp in zip(live, result.token_ids, result.logprobs, strict=True):
                reqs[i].ids.append(tok)
                reqs[i].out.append(tok)
                reqs[i].logprobs.append(lp)
                reqs[i].reason = state[i]["stop"].check(reqs[i].ids)
            live = [i for i in live if reqs[i].reason is None]
    return reqs


CASES: list[dict[str, Any]] = [
    {},  # greedy, default length (20 new tokens)
    {"do_sample": True},  # top_k=50 from the global defaults
    {"do_sample": True, "top_k": 0, "temperature": 0.7},
    {"do_sample": True, "top_k": 50, "top_p": 0.92, "max_new_tokens": 25},
    {"do_sample": True, "top_k": 0, "top_p": 0.8},
    {"do_sample": True, "temperature": 1.3, "top_k": 7, "top_p": 0.9, "max_length": 30},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(o) or "greedy")
def test_single_request_matches_generate(model: GPT2LMHeadModel, options: dict) -> None:
    for seed in (0, 1, 7):
        prompt = prompt_of(seed, 3 + seed)
        want = hf_generate(model, prompt, seed, **options)
        (got,) = engine_generate(model, [Req(prompt, options, seed)])
        assert got.out == want, (options, seed)
        assert got.reason in (FinishReason.LENGTH, FinishReason.EOS)


def test_unseeded_row_uses_the_global_generator_like_generate(model: GPT2LMHeadModel) -> None:
    prompt = prompt_of(3, 5)
    opts = {"do_sample": True, "top_p": 0.9}
    want = hf_generate(model, prompt, 123, **opts)
    torch.manual_seed(123)
    (got,) = engine_generate(model, [Req(prompt, opts, None)])
    assert got.out == want


def test_min_new_tokens_bans_eos_like_generate(model: GPT2LMHeadModel) -> None:
    prompt = prompt_of(5, 6)
    with torch.no_grad():
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    # Make greedy's first choice the eos token: without the ban it would stop at once.
    for opts in (
        {"eos_token_id": first, "min_new_tokens": 4, "max_new_tokens": 12},
        {"eos_token_id": [first, EOS], "min_length": len(prompt) + 3},
        {"eos_token_id": first, "do_sample": True, "top_k": 3, "min_new_tokens": 6},
    ):
        want = hf_generate(model, prompt, 11, **opts)
        (got,) = engine_generate(model, [Req(prompt, opts, 11)])
        assert got.out == want, opts
    (plain,) = engine_generate(model, [Req(prompt, {"eos_token_id": first}, None)])
    assert plain.out == [first] and plain.reason is FinishReason.EOS


def test_seeded_rows_are_independent_of_the_batch(model: GPT2LMHeadModel) -> None:
    reqs = [
        Req(prompt_of(0, 4), {"do_sample": True, "top_p": 0.92}, 42),
        Req(prompt_of(1, 9), {"do_sample": True, "top_k": 0, "temperature": 0.7}, None),
        Req(prompt_of(2, 3), {}, None),  # greedy
        Req(prompt_of(3, 6), {"do_sample": True, "temperature": 0.7, "top_k": 20}, 7),
        Req(prompt_of(4, 5), {"do_sample": True, "max_new_tokens": 5}, None),
        Req(prompt_of(5, 7), {"do_sample": True, "top_k": 50, "top_p": 0.92}, 42),
        Req(prompt_of(6, 2), {"do_sample": True, "temperature": 1.3, "top_p": 0.5}, 3),
    ]
    torch.manual_seed(999)  # unseeded rows draw from the default generator
    engine_generate(model, reqs)
    for req in reqs:
        if req.seed is None and req.options.get("do_sample"):
            continue
        want = hf_generate(model, req.prompt, req.seed or 0, **req.options)
        assert req.out == want, req.options
        (alone,) = engine_generate(model, [Req(req.prompt, req.options, req.seed)])
        assert alone.out == req.out


def test_logprobs_are_raw_log_softmax(model: GPT2LMHeadModel) -> None:
    prompt = prompt_of(8, 4)
    (got,) = engine_generate(model, [Req(prompt, {"max_new_tokens": 3}, None)])
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    assert got.logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1)[got.out[0]]))
    assert all(lp <= 0 for lp in got.logprobs)


def test_sampler_vectorized_rows_match_per_row_processing() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 300, dtype=torch.float64) * 3
    logits[2, :10] = logits[2, 10]  # ties at the top-k boundary
    seeds = [1, 2, 3, None, 4, 5]
    settings = [  # (do_sample, temperature, top_k, top_p, min_length, eos ids)
        (True, 0.7, 0, 1.0, 0, ()),
        (True, 1.0, 50, 0.92, 0, ()),
        (True, 1.0, 11, 1.0, 0, ()),
        (False, 0.5, 3, 0.5, 0, ()),
        (True, 2.0, 400, 0.3, 0, ()),  # top_k beyond the vocab
        (True, 1.0, 0, 1.0, 4, (5, 9)),  # eos banned: 2 tokens < min_length 4
    ]

    def make_rows() -> list[SamplingRow]:
        return [
            SamplingRow([0, 0], *opts, generator=None if s is None else make_generator(s))
            for opts, s in zip(settings, seeds, strict=True)
        ]

    batched = Sampler().sample(logits, make_rows()).token_ids
    for j, row in enumerate(make_rows()):
        assert Sampler().sample(logits[j : j + 1], [row]).token_ids == [batched[j]]
    assert batched[5] not in (5, 9)


def test_make_generator_matches_manual_seed() -> None:
    probs = torch.softmax(torch.randn(1, 300), -1)
    torch.manual_seed(5)
    want = [int(torch.multinomial(probs, 1)) for _ in range(5)]
    g = make_generator(5)
    assert [int(torch.multinomial(probs, 1, generator=g)) for _ in range(5)] == want


# ------------------------------------------------------------------ resolve_sampling_params

GPT2_GEN = {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": None, "max_length": None}


def test_defaults_follow_generate() -> None:
    p = resolve_sampling_params({}, GPT2_GEN, 1024, prompt_len=7)
    # 5.x: the global default max_length=20 means 20 NEW tokens unless someone set max_length.
    assert (p.max_length, p.max_new_tokens) == (27, 20)
    assert (p.do_sample, p.temperature, p.top_k, p.top_p) == (False, 1.0, 50, 1.0)
    assert (p.eos_token_id, p.pad_token_id, p.min_length) == (1, 1, 0)
    assert p.stop_strings == [] and p.num_return_sequences == 1 and p.seed is None
    # ... capped at the model's positions
    assert resolve_sampling_params({}, GPT2_GEN, 30, prompt_len=25).max_length == 30


def test_explicit_max_length_counts_the_prompt() -> None:
    p = resolve_sampling_params({"max_length": 20}, GPT2_GEN, 1024, prompt_len=7)
    assert (p.max_length, p.max_new_tokens) == (20, 13)
    with pytest.raises(ParamValidationError) as err:
        resolve_sampling_params({"max_length": 7}, GPT2_GEN, 1024, prompt_len=7)
    assert err.value.field == "max_length"


def test_max_new_tokens_takes_precedence() -> None:
    p = resolve_sampling_params({"max_length": 9, "max_new_tokens": 5}, GPT2_GEN, 1024, 7)
    assert (p.max_length, p.max_new_tokens) == (12, 5)
    p = resolve_sampling_params({"min_length": 30, "min_new_tokens": 2}, GPT2_GEN, 1024, 7)
    assert (p.min_length, p.min_new_tokens) == (9, 2)


def test_generation_config_overrides_global_defaults() -> None:
    ckpt = dict(GPT2_GEN, do_sample=True, top_k=0, top_p=0.9, temperature=0.8, max_length=64)
    p = resolve_sampling_params({}, ckpt, 1024, prompt_len=7)
    assert (p.do_sample, p.top_k, p.top_p, p.temperature) == (True, 0, 0.9, 0.8)
    assert (p.max_length, p.max_new_tokens) == (64, 57)  # a checkpoint max_length counts the prompt
    p = resolve_sampling_params({"top_k": 5, "max_new_tokens": 3}, ckpt, 1024, prompt_len=7)
    assert (p.top_k, p.max_length) == (5, 10)
    ckpt_new = dict(GPT2_GEN, max_new_tokens=40, pad_token_id=3)
    p = resolve_sampling_params({"max_length": 12}, ckpt_new, 1024, prompt_len=7)
    assert (p.max_length, p.pad_token_id) == (47, 3)  # HF: max_new_tokens wins at any level
    p = resolve_sampling_params({"eos_token_id": [4, 5], "ignore_eos": True}, GPT2_GEN, 1024, 3)
    assert p.pad_token_id == 4 and p.eos_token_ids == ()


def test_none_means_omitted() -> None:
    p = resolve_sampling_params({"top_k": None, "seed": None}, GPT2_GEN, 1024, 3)
    assert p.top_k == 50 and p.seed is None


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"temperature": -0.5}, "temperature", "> 0"),
        ({"temperature": math.nan}, "temperature", "finite"),
        ({"temperature": math.inf, "do_sample": True}, "temperature", "finite"),
        ({"temperature": 0.0, "do_sample": True}, "temperature", "do_sample=false"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"top_p": math.nan}, "top_p", "finite"),
        ({"top_k": -1}, "top_k", ">= 0"),
        ({"top_k": 2.5}, "top_k", "integer"),
        ({"max_new_tokens": 0}, "max_new_tokens", ">= 1"),
        ({"max_new_tokens": 1020}, "max_new_tokens", "1024"),
        ({"max_length": 2000}, "max_length", "1024"),
        ({"min_new_tokens": 30}, "min_new_tokens", "maximum"),
        ({"min_length": 50, "max_new_tokens": 10}, "min_length", "maximum"),
        ({"min_new_tokens": -1}, "min_new_tokens", ">= 0"),
        ({"num_return_sequences": 2}, "num_return_sequences", "1"),
        ({"eos_token_id": -3}, "eos_token_id", ">= 0"),
        ({"eos_token_id": []}, "eos_token_id", "non-empty"),
        ({"stop_strings": [""]}, "stop_strings", "non-empty"),
        ({"seed": 2**64}, "seed", "integer"),
        ({"do_sample": "yes"}, "do_sample", "true or false"),
        ({"top_kk": 3}, "top_kk", "unknown"),
    ],
)
def test_validation_names_the_field(options: dict, field: str, words: str) -> None:
    with pytest.raises(ParamValidationError) as err:
        resolve_sampling_params(options, GPT2_GEN, 1024, prompt_len=10)
    assert err.value.field == field
    assert field in str(err.value) and words in str(err.value)


def test_validation_of_lengths_names_both_numbers() -> None:
    with pytest.raises(ParamValidationError) as err:
        resolve_sampling_params({"max_new_tokens": 100}, GPT2_GEN, 128, prompt_len=40)
    assert "140" in err.value.message and "128" in err.value.message and "88" in err.value.message
    with pytest.raises(ParamValidationError) as err:
        resolve_sampling_params({}, GPT2_GEN, 128, prompt_len=128)
    assert err.value.field == "inputs" and "128" in err.value.message


def test_greedy_ignores_sampling_only_values_like_generate() -> None:
    # HF only warns about these when do_sample is off; temperature=0 is a common "greedy" spelling.
    p = resolve_sampling_params({"temperature": 0, "top_k": 0}, GPT2_GEN, 1024, 3)
    assert p.do_sample is False and p.temperature == 0.0
    assert isinstance(
        resolve_sampling_params({"temperature": 2}, GPT2_GEN, 1024, 3).temperature, float
    )
