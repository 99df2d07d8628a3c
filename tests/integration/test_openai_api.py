"""OpenAI compatibility: the `openai` package unchanged against /v1/completions and /v1/models."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.conftest import LiveServer


@pytest.fixture(scope="module")
def oai(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(live_server: LiveServer) -> str:
    return live_server.state.model_name


def test_models(oai: openai.OpenAI, model: str) -> None:
    assert [m.id for m in oai.models.list().data] == [model]
    assert oai.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        oai.models.retrieve("gpt-4")
    assert info.value.code == "model_not_found"
    # One model served: any name is it, and the answer names the served model (TGI).
    done = oai.completions.create(model="gpt-4", prompt="a", max_tokens=1)
    assert done.model == model


def test_greedy_equals_tgi(oai: openai.OpenAI, model: str, client: httpx.Client) -> None:
    done = oai.completions.create(model=model, prompt="대한민국은", max_tokens=12, temperature=0)
    body = {"inputs": "대한민국은", "parameters": {"max_new_tokens": 12}}
    tgi = client.post("/generate", json=body)
    assert done.choices[0].text == tgi.json()["generated_text"]
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_stream_equals_non_stream(oai: openai.OpenAI, model: str) -> None:
    kwargs = {"model": model, "prompt": "모든 국민은", "max_tokens": 10, "seed": 11}
    full = oai.completions.create(**kwargs, temperature=0.9)
    chunks = list(
        oai.completions.create(
            **kwargs, temperature=0.9, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    finals = [f for f in finals if f]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage no chunk carries usage (OpenAI's stream).
    plain = list(oai.completions.create(**kwargs, temperature=0.9, stream=True))
    assert all(c.usage is None and c.choices for c in plain)
    assert "".join(c.choices[0].text for c in plain) == full.choices[0].text


def test_extra_body_options_match_tgi(oai: openai.OpenAI, model: str, client: httpx.Client) -> None:
    extra = {"top_k": 5, "repetition_penalty": 1.3}
    done = oai.completions.create(
        model=model, prompt="국회는", max_tokens=8, temperature=0.7, seed=2, extra_body=extra
    )
    params = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_p": 1.0, "seed": 2}
    tgi = client.post("/generate", json={"inputs": "국회는", "parameters": {**params, **extra}})
    assert done.choices[0].text == tgi.json()["generated_text"]


def test_prompts_as_list_and_token_ids(
    oai: openai.OpenAI, model: str, client: httpx.Client
) -> None:
    ids = [t["id"] for t in client.post("/tokenize", json={"inputs": "법률은"}).json()]
    done = oai.completions.create(
        model=model, prompt=["법률은", "국회는"], max_tokens=6, temperature=0
    )
    assert [c.index for c in done.choices] == [0, 1]
    by_ids = oai.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == done.choices[0].text
    streamed = list(
        oai.completions.create(
            model=model, prompt=["법률은", "국회는"], max_tokens=6, temperature=0, stream=True
        )
    )
    for index in (0, 1):
        text = "".join(c.choices[0].text for c in streamed if c.choices[0].index == index)
        assert text == done.choices[index].text


def test_logprobs_and_echo(oai: openai.OpenAI, model: str, client: httpx.Client) -> None:
    prompt = "대한민국은"
    n_prompt = len(client.post("/tokenize", json={"inputs": prompt}).json())
    done = oai.completions.create(
        model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True
    )
    choice = done.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + 5
    assert lp.token_logprobs[0] is None  # no context: null, as OpenAI (the rest: real)
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[n_prompt:])
    assert lp.text_offset == sorted(lp.text_offset)
    only = oai.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True)
    assert only.choices[0].text == prompt and only.usage.completion_tokens == 0


def test_logit_bias_forces_a_token(oai: openai.OpenAI, model: str) -> None:
    token = 100
    done = oai.completions.create(
        model=model,
        prompt="국민은",
        max_tokens=4,
        temperature=0,
        logprobs=0,
        logit_bias={str(token): 100},
        extra_body={"ignore_eos": True},
    )
    assert done.usage.completion_tokens == 4
    assert len(set(done.choices[0].logprobs.tokens)) == 1


def test_errors_carry_the_message(oai: openai.OpenAI, model: str) -> None:
    """Request errors are OpenAI's: 400 invalid_request_error naming the field."""
    cases = [
        ({"n": 2, "temperature": 0}, "n"),  # greedy gives one sequence
        ({"max_tokens": 5000}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"extra_body": {"top_kk": 3}}, "top_kk"),
        ({"extra_body": {"top_k": -2}}, "top_k"),
        ({"suffix": "끝"}, "suffix"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            oai.completions.create(model=model, prompt="국민은", **{"max_tokens": 4, **kwargs})
        err = info.value
        assert err.status_code == 400 and err.param == param, (kwargs, err.body)
        assert err.type == "invalid_request_error" and param in err.message, err.message
    with pytest.raises(openai.BadRequestError, match="maximum context length is") as info:
        oai.completions.create(model=model, prompt="가 " * 2000, max_tokens=4)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"


def test_n_and_best_of(oai: openai.OpenAI, model: str, client: httpx.Client) -> None:
    """n / best_of map to num_return_sequences; runs once the engine serves n > 1."""
    if client.get("/info").json()["max_best_of"] < 3:
        pytest.skip("the engine serves one sequence per request so far")
    kwargs = {"model": model, "max_tokens": 5, "temperature": 0.9, "seed": 1}
    done = oai.completions.create(prompt=["국민은", "국회는"], n=2, **kwargs)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    best = oai.completions.create(prompt="국민은", n=2, best_of=3, logprobs=0, **kwargs)
    scores = [sum(c.logprobs.token_logprobs) for c in best.choices]
    assert len(scores) == 2 and scores[0] >= scores[1]
    chunks = list(oai.completions.create(prompt="국민은", n=2, stream=True, **kwargs))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
