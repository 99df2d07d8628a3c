"""Security settings on a live server (test_errors.py has the basic 401 / 413 / CORS cases):
the API key on every operation of the schema (streams included) with a constant-time
comparison, the probes public or not as configured, the body limit at its exact boundary
(with and without Content-Length), no prompt or output text in any log unless --log-prompts,
no stack trace or exception text in any response, and CORS off by default."""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.api.routes import admin as routes_admin
from app.api.routes import generate as routes_generate
from app.api.routes import openai as routes_openai
from tests.integration.conftest import API_KEY, LiveServer, sse_events, start_server, stop_server
from tests.integration.log_capture import server_logs

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ORIGIN = "https://app.example"
BODY_LIMIT = 512
PROBES = ("/health", "/ready", "/metrics")


def shared(live_server: LiveServer, **update: Any) -> Iterator[LiveServer]:
    """A second app over the session server's model and engine, with other settings."""
    settings = live_server.state.settings.model_copy(update=update)
    live = start_server(settings, dataclasses.replace(live_server.state, settings=settings))
    try:
        yield live
    finally:
        stop_server(live)


@pytest.fixture(scope="module")
def locked_server(live_server: LiveServer) -> Iterator[LiveServer]:
    """API key with private probes, a tiny body limit, and one CORS origin."""
    yield from shared(
        live_server,
        api_key=SecretStr(API_KEY),
        public_health_metrics=False,
        max_body_bytes=BODY_LIMIT,
        cors_allow_origins=ORIGIN,
    )


@pytest.fixture(scope="module")
def chatty_server(live_server: LiveServer) -> Iterator[LiveServer]:
    """--log-prompts on, CORS for any origin."""
    yield from shared(live_server, log_prompts=True, cors_allow_origins="*")


def operations(server: LiveServer) -> list[tuple[str, str]]:
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    return [
        (method.upper(), path.replace("{model}", "kogpt2-mini"))
        for path, item in spec["paths"].items()
        for method in item
    ]


def error_message(r: httpx.Response) -> str:
    body = r.json()
    return body["error"]["message"] if r.url.path.startswith("/v1/") else body["error"]


# -- API key -----------------------------------------------------------------------------------


def test_every_operation_needs_the_key(keyed_server: LiveServer) -> None:
    ops = operations(keyed_server)
    assert {("POST", "/few-shot"), ("POST", "/v1/completions"), ("POST", "/")} <= set(ops)
    url = keyed_server.base_url
    for method, path in ops:
        public = path in PROBES  # public_health_metrics defaults to true
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, f"{url}{path}", json={"inputs": "a"}, headers=headers)
            if public:
                assert r.status_code == 200, (method, path, r.text)
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            message = error_message(r)
            assert "Authorization: Bearer" in message
            assert ("invalid" if headers.get("Authorization") == "Bearer wrong" else "missing") in (
                message
            )


def test_the_key_opens_streams_and_the_scheme_is_case_insensitive(
    keyed_server: LiveServer,
) -> None:
    url = keyed_server.base_url
    body = {"inputs": "국민", "parameters": {"max_new_tokens": 2}}
    for auth in (f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER  {API_KEY}"):
        with httpx.stream(
            "POST", f"{url}/generate_stream", json=body, headers={"Authorization": auth}
        ) as r:
            assert r.status_code == 200
            events = list(sse_events(r.iter_lines()))
        assert events[-1]["details"]["generated_tokens"] == 2
    oai = {"prompt": "국민", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=oai) as r:
        assert r.status_code == 401  # refused before the stream starts
    with httpx.stream("POST", f"{url}/v1/completions", json=oai, headers=AUTH) as r:
        assert r.status_code == 200 and list(sse_events(r.iter_lines()))[-1] == "[DONE]"


def test_no_path_spelling_reaches_an_operation_without_the_key(keyed_server: LiveServer) -> None:
    url = keyed_server.base_url
    body = {"inputs": "국민", "parameters": {"max_new_tokens": 2}}
    for path in ("/generate/", "//generate", "/health/../generate", "/GENERATE", "/generate%20"):
        r = httpx.post(f"{url}{path}", json=body)
        assert r.status_code in (401, 404), (path, r.status_code)


def test_the_key_is_compared_in_constant_time(
    keyed_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key check goes through hmac.compare_digest, and its verdict decides."""
    calls: list[tuple[bytes, bytes]] = []

    def spy(given: bytes, expected: bytes) -> bool:
        calls.append((given, expected))
        return verdict

    monkeypatch.setattr(hmac, "compare_digest", spy)
    url = f"{keyed_server.base_url}/info"
    verdict = False
    for key in (API_KEY, "x", API_KEY + "x"):
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert calls == [(k.encode(), API_KEY.encode()) for k in (API_KEY, "x", API_KEY + "x")]
    verdict = True  # whatever compare_digest says goes: no other comparison exists
    assert httpx.get(url, headers={"Authorization": "Bearer x"}).status_code == 200


def test_probes_need_the_key_when_not_public(locked_server: LiveServer) -> None:
    url = locked_server.base_url
    for path in PROBES:
        assert httpx.get(f"{url}{path}").status_code == 401, path
        assert httpx.get(f"{url}{path}", headers=AUTH).status_code == 200, path
    for path in ("/docs", "/openapi.json"):  # the API's description stays readable
        assert httpx.get(f"{url}{path}").status_code == 200, path


# -- body size limit ---------------------------------------------------------------------------


def padded_body(size: int) -> bytes:
    """A JSON body of exactly `size` bytes."""
    head, tail = b'{"inputs": "', b'", "parameters": {"max_new_tokens": 1}}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def chunked(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 100):
        yield body[start : start + 100]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_limit_is_exact(locked_server: LiveServer, framing: str) -> None:
    url = f"{locked_server.base_url}/tokenize"
    for size, status in ((BODY_LIMIT, 200), (BODY_LIMIT + 1, 413)):
        body = padded_body(size)
        content = body if framing == "content-length" else chunked(body)
        r = httpx.post(url, content=content, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == status, (size, r.text)
        if status == 413:
            assert str(BODY_LIMIT) in r.json()["error"]


def test_body_limit_answers_in_the_openai_shape(locked_server: LiveServer) -> None:
    body = b'{"prompt": "' + b"a" * BODY_LIMIT + b'"}'
    r = httpx.post(
        f"{locked_server.base_url}/v1/completions",
        content=chunked(body),
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


# -- logs --------------------------------------------------------------------------------------

SECRET = "비밀번호는 zebra-canary-7731"


def exercise(url: str) -> list[str]:
    """The secret prompt on every prompt-taking route; returns the texts generated."""
    params = {"max_new_tokens": 6, "ignore_eos": True}
    outputs = []
    r = httpx.post(f"{url}/generate", json={"inputs": SECRET, "parameters": params})
    outputs.append(r.json()["generated_text"])
    with httpx.stream(
        "POST", f"{url}/generate_stream", json={"inputs": SECRET, "parameters": params}
    ) as s:
        outputs.append(list(sse_events(s.iter_lines()))[-1]["generated_text"])
    r = httpx.post(f"{url}/v1/completions", json={"prompt": SECRET, "max_tokens": 6})
    outputs.append(r.json()["choices"][0]["text"])
    r = httpx.post(f"{url}/few-shot", json={"query": SECRET, "parameters": params})
    outputs.append(r.json()["answer"])
    assert httpx.post(f"{url}/tokenize", json={"inputs": SECRET}).status_code == 200
    assert httpx.post(f"{url}/generate", json={"inputs": SECRET, "bad": 1}).status_code == 422
    return [o.strip() for o in outputs if len(o.strip()) >= 4]


def as_json(text: str) -> str:
    """How a text appears inside the JSON log lines."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def test_prompts_and_outputs_are_not_logged_by_default(live_server: LiveServer) -> None:
    with server_logs(logging.DEBUG) as logs:
        outputs = exercise(live_server.base_url)
        live_server.wait_idle()
    text = logs.text()
    assert '"event": "generation"' in text  # the request log lines were captured ...
    assert "zebra-canary" not in text and "비밀번호" not in text  # ... without the prompt
    assert outputs and not [o for o in outputs if o in text or as_json(o) in text]


def test_log_prompts_logs_them(chatty_server: LiveServer) -> None:
    with server_logs(logging.DEBUG) as logs:
        outputs = exercise(chatty_server.base_url)
        chatty_server.wait_idle()
    text = logs.text()
    assert "zebra-canary-7731" in text
    assert outputs and all(as_json(o) in text for o in outputs)


# -- no stack traces ---------------------------------------------------------------------------

LEAK = "secret-internal-detail"


def fail(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(LEAK)


def test_internal_errors_are_generic(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in a route (the engine's faults are another test's) is a
    generic 500 in the route's error shape, logged with its traceback on the server only."""
    url = live_server.base_url
    monkeypatch.setattr(routes_admin, "info_dict", fail)
    monkeypatch.setattr(routes_openai, "model_card", fail)
    monkeypatch.setattr(routes_generate, "special_ids", fail)  # raised inside the stream
    with server_logs(logging.WARNING) as logs:
        info = httpx.get(f"{url}/info")
        models = httpx.get(f"{url}/v1/models")
        body = {"inputs": "국민", "parameters": {"max_new_tokens": 2}}
        with httpx.stream("POST", f"{url}/generate_stream", json=body) as s:
            events = list(sse_events(s.iter_lines()))
    assert info.status_code == 500
    assert info.json() == {
        "error": "internal server error",
        "error_type": "internal",
        "field": None,
    }
    assert models.status_code == 500
    assert models.json()["error"] == {
        "message": "internal server error",
        "type": "internal",
        "param": None,
        "code": 500,
    }
    assert events == [{"error": "internal error", "error_type": "internal", "field": None}]
    for text in (info.text, models.text, str(events)):
        assert LEAK not in text and "Traceback" not in text and "RuntimeError" not in text
    logged = [r for r in logs.records if r.exc_info is not None]
    # the app logs each (uvicorn may log the re-raised 500s once more)
    assert len(logged) >= 3 and all(LEAK in str(r.exc_info[1]) for r in logged if r.exc_info)
    live_server.wait_idle()


# -- CORS --------------------------------------------------------------------------------------


def preflight(url: str, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return httpx.options(url, headers=headers)


def test_cors_is_off_by_default(live_server: LiveServer) -> None:
    url = live_server.base_url
    assert live_server.state.settings.cors_allow_origins is None
    r = preflight(f"{url}/generate", ORIGIN)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{url}/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in r.headers


def test_cors_allows_only_the_configured_origin(locked_server: LiveServer) -> None:
    url = f"{locked_server.base_url}/generate"
    ok = preflight(url, ORIGIN)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = preflight(url, "https://evil.example")
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # A real request still needs the key; the 401 is readable by the allowed page.
    r = httpx.post(url, json={"inputs": "a"}, headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.post(url, json={"inputs": "a"}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 401 and "access-control-allow-origin" not in r.headers


def test_cors_any_origin(chatty_server: LiveServer) -> None:
    r = preflight(f"{chatty_server.base_url}/v1/completions", "https://anywhere.example")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
