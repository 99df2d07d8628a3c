"""Bad input over live HTTP: one table of malformed requests against every prompt-taking
route. Each gets a clear 4xx whose field and message name what is wrong (or, where the input
is legitimate, a normal answer), no response carries a stack trace, and the server logs no
error while serving the whole table.

Decisions (docs/reliability.md): an empty prompt is a 422 on every generation route, as in
TGI (`/tokenize` answers an empty text with zero tokens); a prompt of only special tokens
("<s></s><pad>") is a prompt like any other (200); `/tokenize` has no length limit (it is
how a client measures a prompt).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.integration.log_capture import Records, server_logs


@dataclass(frozen=True)
class Endpoint:
    path: str
    prompt: str  # the body field holding the prompt
    options: str | None  # where generate options go: a sub-object, None = top level
    stream: bool = False
    generates: bool = True

    @property
    def openai(self) -> bool:
        return self.path.startswith("/v1/")

    def body(self, prompt: Any = "국민", **options: Any) -> dict[str, Any]:
        body: dict[str, Any] = {self.prompt: prompt}
        if self.stream and self.path != "/generate_stream":
            body["stream"] = True
        if options:
            if self.options is None:
                body.update({self.option(k): v for k, v in options.items()})
            else:
                body[self.options] = options
        return body

    def option(self, name: str) -> str:
        """How this route names a generate option in its errors."""
        return "max_tokens" if self.openai and name == "max_new_tokens" else name


ENDPOINTS = [
    Endpoint("/generate", "inputs", "parameters"),
    Endpoint("/generate_stream", "inputs", "parameters", stream=True),
    Endpoint("/v1/completions", "prompt", None),
    Endpoint("/v1/completions", "prompt", None, stream=True),
    Endpoint("/few-shot", "query", "parameters"),
    Endpoint("/tokenize", "inputs", None, generates=False),
]


@dataclass(frozen=True)
class Expect:
    content: bytes
    status: int  # TGI's: a request error is a 422 (OpenAI's 400 on /v1, see `wire_status`)
    field: str | None = None  # the error's field ends with this (and the message names it)

    def wire_status(self, ep: Endpoint) -> int:
        return 400 if ep.openai and self.status == 422 else self.status


JSON = {"content-type": "application/json"}
SPECIALS = "<s></s><pad>"
LONG_PROMPT = "대한민국 " * 1500


def dumps(body: Any) -> bytes:
    return json.dumps(body).encode()  # NaN / Infinity as Python writes them; \\uXXXX escapes


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def case_empty_prompt(ep: Endpoint) -> Expect:
    if not ep.generates:
        return Expect(dumps(ep.body("")), 200)
    return Expect(dumps(ep.body("", max_new_tokens=2)), 422, ep.prompt)


def case_only_special_tokens(ep: Endpoint) -> Expect:
    extra = {"max_new_tokens": 2} if ep.generates else {}
    return Expect(dumps(ep.body(SPECIALS, **extra)), 200)


def case_lone_surrogate_in_prompt(ep: Endpoint) -> Expect:
    return Expect(dumps(ep.body("국민\ud800")), 422, ep.prompt)


def case_lone_surrogate_in_option(ep: Endpoint) -> Expect | None:
    if not ep.generates:
        return None
    return Expect(dumps(ep.body(stop=["\udfff"])), 422, "stop.0")


def case_invalid_utf8(ep: Endpoint) -> Expect:
    return Expect(b'{"' + ep.prompt.encode() + b'": "\xff\xfe\xc3"}', 422, "body")


def case_body_not_an_object(ep: Endpoint) -> Expect:
    return Expect(dumps(["국민"]), 422, "body")


def case_nested_10k_levels(ep: Endpoint) -> Expect:
    text = f'{{"{ep.prompt}": "국민", "seed": {nested(10_000)}}}'
    return Expect(text.encode(), 422, "body")


def case_nested_option(ep: Endpoint) -> Expect | None:
    if not ep.generates:
        return None
    body = json.loads(f'{{"x": {nested(300)}}}')
    return Expect(dumps(ep.body(watermarking_config=body)), 422, "watermarking_config")


def case_huge_max_new_tokens(ep: Endpoint) -> Expect | None:
    if not ep.generates:
        return None
    return Expect(dumps(ep.body(max_new_tokens=10**12)), 422, ep.option("max_new_tokens"))


def case_prompt_past_the_context(ep: Endpoint) -> Expect:
    if not ep.generates:
        return Expect(dumps(ep.body(LONG_PROMPT)), 200)
    field = "prompt" if ep.path == "/few-shot" else ep.prompt  # the rendered prompt
    return Expect(dumps(ep.body(LONG_PROMPT)), 422, field)


def case_body_too_large(ep: Endpoint) -> Expect:
    return Expect(dumps(ep.body("a" * 1_100_000)), 413)  # the default limit is 1 MiB


def numeric(name: str, value: Any, **others: Any) -> Callable[[Endpoint], Expect | None]:
    def case(ep: Endpoint) -> Expect | None:
        if not ep.generates:
            return None
        return Expect(dumps(ep.body(**others, **{name: value})), 422, ep.option(name))

    return case


def case_prompt_wrong_type(ep: Endpoint) -> Expect:
    return Expect(dumps(ep.body(12345)), 422, ep.prompt)


def case_options_not_an_object(ep: Endpoint) -> Expect | None:
    if ep.options is None or not ep.generates:
        return None
    return Expect(dumps({ep.prompt: "국민", ep.options: "fast"}), 422, ep.options)


def case_unknown_option(ep: Endpoint) -> Expect:
    if not ep.generates:
        return Expect(dumps({"inputs": "국민", "tempurature": 0.5}), 422, "tempurature")
    return Expect(dumps(ep.body(tempurature=0.5)), 422, "tempurature")


SAMPLE = {"do_sample": True}
CASES: dict[str, Callable[[Endpoint], Expect | None]] = {
    "empty prompt": case_empty_prompt,
    "only special tokens": case_only_special_tokens,
    "lone surrogate in the prompt": case_lone_surrogate_in_prompt,
    "lone surrogate in an option": case_lone_surrogate_in_option,
    "invalid UTF-8": case_invalid_utf8,
    "body not an object": case_body_not_an_object,
    "JSON nested 10k levels": case_nested_10k_levels,
    "JSON nested 300 levels in an option": case_nested_option,
    "huge max_new_tokens": case_huge_max_new_tokens,
    "prompt past the context": case_prompt_past_the_context,
    "body past max_body_bytes": case_body_too_large,
    "negative max_new_tokens": numeric("max_new_tokens", -5),
    "negative top_k": numeric("top_k", -2),  # -1 is vLLM's "no top-k" on /v1
    "NaN temperature": numeric("temperature", float("nan")),
    "Infinity top_p": numeric("top_p", float("inf")),
    "-Infinity repetition_penalty": numeric("repetition_penalty", float("-inf")),
    "NaN seed": numeric("seed", float("nan"), **SAMPLE),
    "string max_new_tokens": numeric("max_new_tokens", "5"),
    "string do_sample": numeric("do_sample", "true"),
    "prompt of the wrong type": case_prompt_wrong_type,
    "options not an object": case_options_not_an_object,
    "unknown option": case_unknown_option,
    # guidance's second sequence must fit the model too (was: a 500 for the whole batch)
    "negative prompt ids past the context": numeric(
        "negative_prompt_ids", [5] * 1020, guidance_scale=2.0
    ),
    "negative prompt past the context": numeric("negative_prompt", LONG_PROMPT, guidance_scale=2),
}


@pytest.fixture(scope="module")
def server_errors() -> Iterator[Records]:
    with server_logs(logging.WARNING) as records:
        yield records


def error_of(r: httpx.Response, openai: bool) -> tuple[str | None, str]:
    body = r.json()
    if openai:
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["code"] in (r.status_code, "context_length_exceeded"), err
        if r.status_code == 400:
            assert err["type"] == "invalid_request_error", err
        return err["param"], err["message"]
    assert set(body) == {"error", "error_type", "field"}, body
    return body["field"], body["error"]


def check_answer(r: httpx.Response, ep: Endpoint) -> None:
    if ep.stream:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.text.splitlines() if line.startswith("data:")]
        assert events and all('"error"' not in e for e in events), r.text
    elif ep.path == "/tokenize":
        assert isinstance(r.json(), list)  # TGI's answer: the list of tokens
    else:
        assert isinstance(r.json(), dict)


MATRIX = [
    pytest.param(ep, name, id=f"{ep.path}{' stream' if ep.stream else ''}: {name}")
    for ep in ENDPOINTS
    for name in CASES
]


@pytest.mark.parametrize(("ep", "case"), MATRIX)
def test_bad_input(client: httpx.Client, server_errors: Records, ep: Endpoint, case: str) -> None:
    expect = CASES[case](ep)
    if expect is None:
        pytest.skip("does not apply to this route")
    logged_before = len(server_errors.errors())
    r = client.post(ep.path, content=expect.content, headers=JSON)
    assert server_errors.errors()[logged_before:] == []
    assert r.status_code == expect.wire_status(ep), r.text[:500]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if expect.status == 200:
        check_answer(r, ep)
        return
    field, message = error_of(r, ep.openai)
    if expect.field is not None:
        assert field is not None and field.endswith(expect.field), (field, message)
        assert expect.field.split(".")[0] in message, message


def test_no_error_was_logged_late(server_errors: Records) -> None:
    """After the matrix (same module): nothing was logged after its response either."""
    assert server_errors.errors() == []
