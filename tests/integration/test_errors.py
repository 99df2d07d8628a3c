"""Every error code, in its shape: 401, 404, 413, 422 (400 on /v1, as OpenAI), 429, 503; never a
500 for client input."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tests.integration.conftest import (
    API_KEY,
    LiveServer,
    sse_events,
    start_server,
    stop_server,
)


def tgi_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type", "field"}, body
    return body


def openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """OpenAI's envelope; `code` is OpenAI's code where it has one, else the status."""
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["code"] == (status if code is None else code), body
    if status in (400, 404):
        assert body["type"] == "invalid_request_error", body
    return body


def test_422_names_field_and_range(client: httpx.Client) -> None:
    cases = [
        ({"parameters": {"temperature": -1}}, "temperature", "0"),
        ({"parameters": {"top_p": 1.5}}, "top_p", "1"),
        ({"parameters": {"max_new_tokens": 5000}}, "max_new_tokens", "1024"),
        ({"parameters": {"tempurature": 1}}, "tempurature", "unknown"),
        ({"parameters": {"do_sample": True, "temperature": 0}}, "temperature", "> 0"),
        ({"bogus": 1}, "bogus", "unknown"),
    ]
    for extra, field, hint in cases:
        body = tgi_error(client.post("/generate", json={"inputs": "국민", **extra}), 422)
        assert field in body["field"] and field in body["error"] and hint in body["error"], body


def test_422_prompt_too_long_names_both_numbers(
    client: httpx.Client, live_server: LiveServer
) -> None:
    limit = live_server.state.max_input_tokens
    prompt = "대한민국 " * 1500
    count = len(client.post("/tokenize", json={"inputs": prompt}).json())
    body = tgi_error(client.post("/generate", json={"inputs": prompt}), 422)
    assert str(count) in body["error"] and str(limit) in body["error"]
    r = client.post("/v1/completions", json={"prompt": prompt})
    oai = openai_error(r, 400, "context_length_exceeded")
    assert str(count) in oai["message"] and oai["param"] == "prompt"
    # OpenAI's wording, which LiteLLM maps to ContextWindowExceededError.
    assert oai["message"].startswith(
        f"This model's maximum context length is {live_server.state.max_total_tokens} tokens. "
        f"However, you requested {count + 16} tokens ({count} in the messages, 16 in the "
        "completion)."
    )
    chat = {"messages": [{"role": "user", "content": "안녕"}], "max_tokens": 5000}
    oai = openai_error(
        client.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded"
    )
    assert "maximum context length is" in oai["message"] and oai["param"] == "max_tokens"
    few = tgi_error(client.post("/few-shot", json={"query": prompt}), 422)
    assert few["field"] == "prompt"


def test_422_malformed_bodies(client: httpx.Client) -> None:
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert tgi_error(r, 422)["field"] == "body"
    assert tgi_error(client.post("/generate", json={"inputs": ""}), 422)["field"] == "inputs"
    assert tgi_error(client.post("/few-shot", json={"query": "a", "shots": []}), 422)["field"]
    assert openai_error(client.post("/v1/completions", json={"prompt": []}), 400)["param"]
    assert openai_error(client.post("/v1/completions", json={}), 400)["param"] == "prompt"
    assert tgi_error(client.post("/detokenize", json={"ids": [-1]}), 422)["field"] == "ids"


def test_404_and_405(client: httpx.Client) -> None:
    assert tgi_error(client.get("/nope"), 404)["error_type"] == "not_found"
    assert openai_error(client.get("/v1/nope"), 404)
    missing = openai_error(client.get("/v1/models/gpt-4"), 404, "model_not_found")
    assert missing["param"] == "model"
    assert tgi_error(client.get("/generate"), 405)


def test_413_oversized_body(client: httpx.Client, live_server: LiveServer) -> None:
    limit = live_server.state.settings.max_body_bytes
    big = {"inputs": "가" * limit}
    assert tgi_error(client.post("/generate", json=big), 413)["error_type"] == "payload_too_large"
    assert openai_error(client.post("/v1/completions", json={"prompt": "가" * limit}), 413)

    def chunks():  # no content-length: the limit is enforced while reading
        yield b'{"inputs": "'
        for _ in range(limit // 4096 + 2):
            yield b"a" * 4096
        yield b'"}'

    r = httpx.post(f"{live_server.base_url}/generate", content=chunks(), timeout=30)
    assert tgi_error(r, 413)


def test_401_with_api_key(keyed_server: LiveServer) -> None:
    url = keyed_server.base_url
    body = {"inputs": "국민", "parameters": {"max_new_tokens": 2}}
    missing = tgi_error(httpx.post(f"{url}/generate", json=body), 401)
    assert missing["error_type"] == "authentication"
    wrong = httpx.post(f"{url}/generate", json=body, headers={"Authorization": "Bearer nope"})
    assert tgi_error(wrong, 401) and wrong.headers["www-authenticate"] == "Bearer"
    assert openai_error(httpx.post(f"{url}/v1/completions", json={"prompt": "a"}), 401)
    ok = httpx.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200, ok.text
    for public in ("/health", "/ready", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(f"{url}{public}").status_code == 200, public
    assert httpx.get(f"{url}/info").status_code == 401
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    assert good.models.list().data


def test_429_when_the_waiting_queue_is_full(side_server: LiveServer) -> None:
    url = side_server.base_url
    engine = side_server.state.engine
    long = {"inputs": "헌법", "parameters": {"max_new_tokens": 600, "ignore_eos": True}}
    first_token = threading.Event()
    stop = threading.Event()

    def hold(body: dict) -> None:
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    first_token.set()
                if stop.is_set():
                    return

    running = threading.Thread(target=hold, args=(long,))
    running.start()
    assert first_token.wait(30)
    waiting = threading.Thread(target=hold, args=(long,))
    waiting.start()
    deadline = time.monotonic() + 10
    while engine.num_waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        r = httpx.post(f"{url}/generate", json=long, timeout=30)
        body = tgi_error(r, 429)
        assert body["error_type"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        assert openai_error(httpx.post(f"{url}/v1/completions", json={"prompt": "a"}), 429)
    finally:
        stop.set()
        running.join(30)
        waiting.join(30)
    side_server.wait_idle()
    kv = engine.engine.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_503_while_draining(side_server: LiveServer) -> None:
    url = side_server.base_url
    engine = side_server.state.engine
    side_server.wait_idle()
    engine.draining = True
    try:
        assert httpx.get(f"{url}/ready").json() == {"status": "draining"}
        assert httpx.get(f"{url}/ready").status_code == 503
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.post(f"{url}/generate", json={"inputs": "국민"})
        assert tgi_error(r, 503)["error_type"] == "unavailable" and "retry-after" in r.headers
        assert openai_error(httpx.post(f"{url}/v1/completions", json={"prompt": "a"}), 503)
        with httpx.stream("POST", f"{url}/generate_stream", json={"inputs": "국민"}) as s:
            assert s.status_code == 503
        assert tgi_error(httpx.post(f"{url}/few-shot", json={"query": "a"}), 503)
    finally:
        engine.draining = False
    assert httpx.get(f"{url}/ready").status_code == 200


def test_stream_error_event_shapes(client: httpx.Client) -> None:
    """Errors found before the stream starts are plain JSON errors with a status code."""
    r = client.post("/generate_stream", json={"inputs": "a", "parameters": {"top_k": -3}})
    assert tgi_error(r, 422)["field"].endswith("top_k")
    body = {"prompt": "a", "stream": True, "best_of": 3, "n": 1, "temperature": 1}
    assert openai_error(client.post("/v1/completions", json=body), 400)["param"] == "best_of"
    assert list(sse_events(["data: [DONE]"])) == ["[DONE]"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
FIELDS = st.sampled_from(
    ["temperature", "top_k", "top_p", "seed", "stop", "do_sample", "details",
     "max_length", "min_new_tokens", "eos_token_id", "bad_words_ids", "sequence_bias", "typical_p",
     "repetition_penalty", "num_beams", "best_of", "truncate", "stop_strings", "top_n_tokens"]
)  # fmt: skip


JSON_HEADERS = {"content-type": "application/json"}


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(params=st.dictionaries(FIELDS, JSON, max_size=3), prompt=st.text(max_size=12))
def test_no_500_for_client_input(live_server: LiveServer, params: dict, prompt: str) -> None:
    url = live_server.base_url
    params = {**params, "max_new_tokens": 2}  # max_new_tokens wins over max_length: short
    for path, body in (
        ("/generate", {"inputs": prompt, "parameters": params}),
        ("/v1/completions", {"prompt": prompt, "max_tokens": 2, **params}),
        ("/few-shot", {"query": prompt or "a", "parameters": params}),
    ):
        data = json.dumps(body)  # NaN and Infinity included: Python's json parses them
        r = httpx.post(f"{url}{path}", content=data, headers=JSON_HEADERS, timeout=60)
        assert r.status_code < 500, (path, body, r.text)


def test_cors_preflight_needs_no_key(live_server: LiveServer) -> None:
    origin = "https://app.example"
    update = {"cors_allow_origins": origin, "api_key": SecretStr(API_KEY)}
    live = start_server(live_server.state.settings.model_copy(update=update), live_server.state)
    try:
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        r = httpx.options(f"{live.base_url}/v1/completions", headers=headers)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = httpx.get(f"{live.base_url}/health", headers={"Origin": origin})
        assert r.headers["access-control-allow-origin"] == origin
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    finally:
        stop_server(live)
