"""Grammar-constrained output on every completion endpoint (the embedded model, live server):
the output parses and matches, streamed or not; bad grammars are 422s naming the field."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import pytest

from tests.integration.conftest import sse_events

PROMPT = "대한민국은"
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "이름": {"type": "string", "maxLength": 10},
        "나이": {"type": "integer", "minimum": 0, "maximum": 150},
        "도시": {"enum": ["서울", "부산", "대구"]},
    },
    "required": ["이름", "나이", "도시"],
    "additionalProperties": False,
}
ADDRESS = r"(서울|부산|대구)시 [가-힣]{2,4}구 [0-9]{1,3}번지"
JSON_GRAMMAR = {"type": "json", "value": PERSON}
REGEX_GRAMMAR = {"type": "regex", "value": ADDRESS}
ENOUGH = 80  # new tokens: well beyond what these grammars need with the embedded model


def valid_person(text: str) -> None:
    jsonschema.validate(json.loads(text), PERSON)


def valid_address(text: str) -> None:
    assert re.fullmatch(ADDRESS, text), text


def test_generate_json_and_regex(client: httpx.Client) -> None:
    for grammar, check in ((JSON_GRAMMAR, valid_person), (REGEX_GRAMMAR, valid_address)):
        for extra in ({}, {"do_sample": True, "seed": 11, "top_k": 0}):
            params = {"max_new_tokens": ENOUGH, "grammar": grammar, "details": True, **extra}
            r = client.post("/generate", json={"inputs": PROMPT, "parameters": params})
            assert r.status_code == 200, r.text
            out = r.json()
            check(out["generated_text"])
            assert out["details"]["finish_reason"] == "eos_token"


def test_generate_stream_and_best_of(client: httpx.Client) -> None:
    params = {"max_new_tokens": ENOUGH, "grammar": JSON_GRAMMAR, "do_sample": True, "seed": 3}
    with client.stream(
        "POST", "/generate_stream", json={"inputs": PROMPT, "parameters": params}
    ) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    valid_person(text)
    assert events[-1]["generated_text"] == text
    params = {"max_new_tokens": ENOUGH, "grammar": REGEX_GRAMMAR, "best_of": 3, "seed": 5,
              "do_sample": True, "details": True}  # fmt: skip
    out = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    valid_address(out["generated_text"])
    for seq in out["details"]["best_of_sequences"] or []:
        valid_address(seq["generated_text"])


def test_openai_completions_response_format_and_grammar(client: httpx.Client) -> None:
    base = {"prompt": PROMPT, "max_tokens": ENOUGH, "temperature": 0.8, "seed": 2}
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    bodies = [
        ({**base, "response_format": schema_format, "n": 2}, valid_person),
        ({**base, "response_format": {"type": "json_object"}}, lambda t: json.loads(t)),
        ({**base, "grammar": REGEX_GRAMMAR}, valid_address),
    ]
    for body, check in bodies:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            check(choice["text"])
            assert choice["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={**bodies[0][0], "stream": True}) as r:
        assert r.status_code == 200
        chunks = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert sorted(texts) == [0, 1]
    for text in texts.values():
        valid_person(text)
    text_format = {**base, "response_format": {"type": "text"}, "max_tokens": 4}
    assert client.post("/v1/completions", json=text_format).status_code == 200


def test_chat_completions_response_format(client: httpx.Client) -> None:
    body = {
        "messages": [{"role": "user", "content": "서울에 사는 사람을 JSON으로 소개하세요."}],
        "max_tokens": ENOUGH,
        "response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}},
        "seed": 1,
    }
    r = client.post("/v1/chat/completions", json=body)
    if r.status_code == 404:
        pytest.skip("no /v1/chat/completions route")
    assert r.status_code == 200, r.text
    valid_person(r.json()["choices"][0]["message"]["content"])


def test_few_shot_with_a_grammar(client: httpx.Client) -> None:
    body = {
        "task": "다음 문장의 감정을 분류하세요.",
        "examples": [{"input": "정말 좋았다.", "output": "긍정"}],
        "query": "별로였다.",
        "parameters": {"grammar": {"type": "regex", "value": "(긍정|부정|중립)"}},
    }
    out = client.post("/few-shot", json=body).json()
    assert out["answer"] in ("긍정", "부정", "중립"), out
    with client.stream("POST", "/few-shot", json={**body, "stream": True}) as r:
        events = list(sse_events(r.iter_lines()))
    assert events[-1]["generated_text"] in ("긍정", "부정", "중립")


def test_allowed_token_ids(client: httpx.Client) -> None:
    allowed = client.post("/tokenize", json={"inputs": "국민 국가 법률"}).json()
    ids = sorted({t["id"] for t in allowed})
    params = {"max_new_tokens": 6, "allowed_token_ids": ids, "details": True}
    out = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    assert {t["id"] for t in out["details"]["tokens"]} <= set(ids)


BAD: list[tuple[dict[str, Any], str]] = [
    ({"type": "regex", "value": "(서울"}, "unclosed group"),
    ({"type": "json", "value": {"type": "foo"}}, "foo"),
    ({"type": "json", "value": "{oops"}, "not valid JSON"),
]


@pytest.mark.parametrize(("grammar", "words"), BAD)
def test_invalid_grammars_are_422_on_every_endpoint(
    client: httpx.Client, grammar: dict[str, Any], words: str
) -> None:
    for path in ("/generate", "/generate_stream"):
        r = client.post(path, json={"inputs": PROMPT, "parameters": {"grammar": grammar}})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "grammar" and words in r.json()["error"]
    r = client.post("/few-shot", json={"query": "질문", "parameters": {"grammar": grammar}})
    assert r.status_code == 422 and r.json()["field"] == "grammar" and words in r.text
    r = client.post("/v1/completions", json={"prompt": PROMPT, "grammar": grammar})
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar", r.text
    if grammar["type"] == "json" and isinstance(grammar["value"], dict):
        fmt = {"type": "json_schema", "json_schema": {"schema": grammar["value"]}}
        r = client.post("/v1/completions", json={"prompt": PROMPT, "response_format": fmt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_unsupported_combinations_are_422(client: httpx.Client) -> None:
    cases = [
        ({"grammar": JSON_GRAMMAR, "num_beams": 2}, "grammar", "beam"),
        ({"allowed_token_ids": [5, 6], "num_beams": 2}, "allowed_token_ids", "beam"),
        ({"grammar": JSON_GRAMMAR, "output_attentions": True}, "grammar", "output_attentions"),
        ({"grammar": {"type": "xml", "value": "<a/>"}}, "grammar", "type"),
        ({"allowed_token_ids": [999999]}, "allowed_token_ids", "vocabulary"),
    ]
    for params, field, words in cases:
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": params})
        assert r.status_code == 422, (params, r.text)
        # a schema error names its path (parameters.grammar.type), the engine's the option
        assert field in r.json()["field"] and words in r.json()["error"], r.text
    both = {"prompt": PROMPT, "grammar": REGEX_GRAMMAR, "response_format": {"type": "json_object"}}
    r = client.post("/v1/completions", json=both)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT, "response_format": {"type": "json_schema"}}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
