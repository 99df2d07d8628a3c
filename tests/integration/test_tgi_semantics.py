"""TGI's routes follow TGI (router/src/validation.rs, the server's GeneratedText), the other
routes `model.generate` / OpenAI; and the presence / frequency penalties on every route.

- a warper that is set (temperature, top_k, top_p, typical_p) turns sampling on at /generate,
  /generate_stream and POST / (temperature 0 stays greedy); few-shot and /v1 keep their rules;
- a matched stop sequence stays in `generated_text` (TGI, generate(stop_strings=)); /v1 drops
  it (OpenAI);
- `details.seed` reports the seed sampling used, a server-chosen one when none was sent, and
  replaying it gives the same text; greedy reports null;
- TGI's grammar / response_format objects {"type": "json" | "json_object" | "regex", "value"}
  on /generate, /v1/completions and /v1/chat/completions.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import pytest

from tests.integration.conftest import sse_events

PROMPT = "대한민국은"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "도시": {"enum": ["서울", "부산"]},
        "인구": {"type": "integer", "minimum": 0, "maximum": 9999},
    },
    "required": ["도시", "인구"],
    "additionalProperties": False,
}
DIGITS = "[0-9]{2,5}"
ENOUGH = 80  # new tokens: well beyond what these grammars need


def generate(client: httpx.Client, parameters: dict[str, Any], path: str = "/generate") -> Any:
    r = client.post(path, json={"inputs": PROMPT, "parameters": parameters})
    assert r.status_code == 200, r.text
    out = r.json()
    return out[0] if path == "/" else out


def stream(client: httpx.Client, parameters: dict[str, Any]) -> list[Any]:
    body = {"inputs": PROMPT, "parameters": parameters}
    with client.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200, r.read()
        return list(sse_events(r.iter_lines()))


def completion(client: httpx.Client, body: dict[str, Any]) -> Any:
    r = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


# -- warpers imply sampling (TGI routes only) --------------------------------------------------


@pytest.mark.parametrize(
    "warper", [{"temperature": 0.9}, {"top_k": 30}, {"top_p": 0.9}, {"typical_p": 0.9}]
)
def test_a_warper_turns_sampling_on(client: httpx.Client, warper: dict[str, Any]) -> None:
    base = {"max_new_tokens": 10, "seed": 4, "details": True, **warper}
    sampled = generate(client, {**base, "do_sample": True})
    for params in ({**base, "do_sample": False}, base):
        out = generate(client, params)
        assert out["generated_text"] == sampled["generated_text"], params
        assert out["details"]["seed"] == 4
    greedy = generate(client, {"max_new_tokens": 10, "details": True})
    assert sampled["generated_text"] != greedy["generated_text"]
    assert greedy["details"]["seed"] is None


def test_temperature_zero_stays_greedy(client: httpx.Client) -> None:
    greedy = generate(client, {"max_new_tokens": 8, "details": True})
    out = generate(client, {"max_new_tokens": 8, "temperature": 0, "details": True})
    assert out == greedy and out["details"]["seed"] is None


def test_stream_and_compat_route_follow_the_same_rule(client: httpx.Client) -> None:
    params = {"max_new_tokens": 8, "top_k": 20, "seed": 9}
    sampled = generate(client, {**params, "do_sample": True})["generated_text"]
    assert generate(client, params, path="/")["generated_text"] == sampled
    assert stream(client, params)[-1]["generated_text"] == sampled


def test_other_routes_keep_generates_rule(client: httpx.Client) -> None:
    """Few-shot: generate's rule (do_sample decides); /v1: temperature > 0 samples (OpenAI)."""
    body = {"query": "서울", "examples": [{"input": "부산", "output": "항구"}]}

    def answer(parameters: dict[str, Any]) -> str:
        r = client.post("/few-shot", json={**body, "parameters": parameters})
        assert r.status_code == 200, r.text
        return str(r.json()["answer"])

    plain = {"max_new_tokens": 8, "stop": ["없음"]}
    assert answer({**plain, "top_k": 5, "seed": 1}) == answer(plain)


# -- stop sequences stay in generated_text ------------------------------------------------------


def test_stop_sequence_is_kept_on_tgi_routes_and_dropped_on_v1(client: httpx.Client) -> None:
    full = generate(client, {"max_new_tokens": 24, "ignore_eos": True})["generated_text"]
    words = full.split()
    assert len(words) > 2, full
    stop = words[1]
    cut = full.index(stop)
    params = {"max_new_tokens": 24, "ignore_eos": True, "stop": [stop], "details": True}
    for path in ("/generate", "/"):
        out = generate(client, params, path=path)
        text = out["generated_text"]
        assert out["details"]["finish_reason"] == "stop_sequence"
        # generate(stop_strings=) stops at the token that completes the stop string: the text
        # holds it (and whatever else that token spells), and is a prefix of the full text.
        assert stop in text and full.startswith(text) and len(text) >= cut + len(stop), text
        assert "".join(t["text"] for t in out["details"]["tokens"]) == text
    events = stream(client, params)
    assert events[-1]["generated_text"] == text
    assert "".join(e["token"]["text"] for e in events) == text
    v1 = completion(
        client, {"max_tokens": 24, "temperature": 0, "stop": [stop], "ignore_eos": True}
    )
    assert v1["text"] == full[:cut] and v1["finish_reason"] == "stop"


# -- details.seed always reports the seed used -------------------------------------------------


def test_unseeded_sampling_reports_a_seed_that_replays(client: httpx.Client) -> None:
    params = {"max_new_tokens": 12, "do_sample": True, "details": True}
    first = generate(client, params)
    seed = first["details"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**53
    replay = generate(client, {**params, "seed": seed})
    assert replay["generated_text"] == first["generated_text"]
    assert replay["details"]["tokens"] == first["details"]["tokens"]
    events = stream(client, {"max_new_tokens": 12, "temperature": 0.8})
    seed = events[-1]["details"]["seed"]
    assert isinstance(seed, int)
    again = generate(client, {"max_new_tokens": 12, "temperature": 0.8, "seed": seed})
    assert again["generated_text"] == events[-1]["generated_text"]


def test_greedy_reports_no_seed(client: httpx.Client) -> None:
    for params in ({}, {"seed": 5}):
        out = generate(client, {"max_new_tokens": 4, "details": True, **params})
        assert out["details"]["seed"] is None
    events = stream(client, {"max_new_tokens": 4})
    assert events[-1]["details"]["seed"] is None


# -- TGI's grammar / response_format forms -----------------------------------------------------


def valid_city(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def valid_digits(text: str) -> None:
    assert re.fullmatch(DIGITS, text), text


TGI_FORMS = [
    ({"type": "json", "value": SCHEMA}, valid_city),
    ({"type": "json_object", "value": SCHEMA}, valid_city),  # huggingface_hub's form
    ({"type": "json_schema", "value": {"name": "city", "schema": SCHEMA}}, valid_city),
    ({"type": "regex", "value": DIGITS}, valid_digits),
]


@pytest.mark.parametrize(("grammar", "check"), TGI_FORMS)
def test_tgi_grammar_forms_everywhere(client: httpx.Client, grammar: Any, check: Any) -> None:
    check(generate(client, {"max_new_tokens": ENOUGH, "grammar": grammar})["generated_text"])
    choice = completion(
        client, {"max_tokens": ENOUGH, "temperature": 0, "response_format": grammar}
    )
    check(choice["text"])
    chat = {"messages": [{"role": "user", "content": "도시는?"}], "max_tokens": ENOUGH}
    r = client.post("/v1/chat/completions", json={**chat, "response_format": grammar})
    assert r.status_code == 200, r.text
    check(r.json()["choices"][0]["message"]["content"])


def test_tgi_response_format_errors_name_the_field(client: httpx.Client) -> None:
    chat = {"messages": [{"role": "user", "content": "도시는?"}], "max_tokens": 4}
    for fmt in ({"type": "regex"}, {"type": "regex", "value": "("}):
        r = client.post("/v1/chat/completions", json={**chat, "response_format": fmt})
        assert 400 <= r.status_code < 500 and "response_format" in r.text, r.text


# -- presence / frequency penalties on every route ----------------------------------------------


def test_frequency_penalty_on_tgi_routes(client: httpx.Client) -> None:
    """TGI's `frequency_penalty` (and presence_penalty, a generate option) change the greedy
    text, identically on /generate, the stream, few-shot's engine and /v1."""
    base = {"max_new_tokens": 24, "ignore_eos": True}
    plain = generate(client, base)["generated_text"]
    # Negative: repeats become likelier (the greedy text repeats no token, so a positive
    # penalty would not change it).
    for penalty in ({"frequency_penalty": -2.0}, {"presence_penalty": -1.5}):
        text = generate(client, {**base, **penalty})["generated_text"]
        assert text != plain, penalty
        assert stream(client, {**base, **penalty})[-1]["generated_text"] == text
        v1 = completion(client, {"max_tokens": 24, "temperature": 0, "ignore_eos": True, **penalty})
        assert v1["text"] == text
    r = client.post(
        "/few-shot",
        json={"query": "서울", "parameters": {"frequency_penalty": 0.5, "max_new_tokens": 4}},
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty", "2"),
        ({"presence_penalty": -3}, "presence_penalty", "2"),
        ({"presence_penalty": 0.5, "num_beams": 2}, "presence_penalty", "beam search"),
        (
            {"frequency_penalty": 0.5, "penalty_alpha": 0.6, "top_k": 4},
            "frequency_penalty",
            "class-B",
        ),
        ({"presence_penalty": 0.5, "dola_layers": "low"}, "presence_penalty", "class-B"),
    ],
)
def test_penalty_refusals_name_the_field(
    client: httpx.Client, params: dict[str, Any], field: str, words: str
) -> None:
    r = client.post(
        "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, **params}}
    )
    assert r.status_code == 422, r.text
    assert r.json()["field"].endswith(field) and words in r.json()["error"], r.text


def test_penalties_on_openai_routes(client: httpx.Client) -> None:
    """Completions (n > 1 siblings each with their own counts) and chat serve them."""
    body = {"max_tokens": 16, "temperature": 0.8, "seed": 3, "presence_penalty": 1.2, "n": 2}
    r = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2
    chat = {"messages": [{"role": "user", "content": "안녕"}], "max_tokens": 24}
    texts = []
    for penalty in (0.0, -2.0):
        r = client.post(
            "/v1/chat/completions",
            json={**chat, "temperature": 0, "frequency_penalty": penalty, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["message"]["content"])
    assert texts[0] != texts[1]
    r = client.post("/v1/completions", json={"prompt": PROMPT, "presence_penalty": 2.5})
    assert 400 <= r.status_code < 500 and "presence_penalty" in r.text, r.text
