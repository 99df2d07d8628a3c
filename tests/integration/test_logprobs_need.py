"""Token log-probs are computed only when a response shows them or ranks sequences by them.

The engine skips a greedy row's full-row log-softmax when ``SamplingParams.logprobs`` is
False; each route decides (app/api/serving.py build_params). Every request here is
spied on at ``LLMEngine.add_request`` and its response checked for what it shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import LiveServer


@pytest.fixture()
def seen(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """params.logprobs of every request the engine admits during the test."""
    engine = live_server.state.engine.engine
    original = engine.add_request
    flags: list[bool] = []

    def spy(request_id: str, prompt_token_ids: list[int], params: Any, **lane: Any) -> None:
        flags.append(params.logprobs)
        original(request_id, prompt_token_ids, params, **lane)

    monkeypatch.setattr(engine, "add_request", spy)
    yield flags


def completion(client: httpx.Client, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": "대한민국은", "max_tokens": 4, "temperature": 0, **extra}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_completions(
    client: httpx.Client, live_server: LiveServer, seen: list[bool]
) -> None:
    model = live_server.state.model_name
    plain = completion(client, model)
    assert seen == [False] and plain["choices"][0]["logprobs"] is None
    shown = completion(client, model, logprobs=0)
    assert seen[-1] is True
    token_logprobs = shown["choices"][0]["logprobs"]["token_logprobs"]
    assert len(token_logprobs) == 4 and all(lp <= 0 for lp in token_logprobs)
    assert shown["choices"][0]["text"] == plain["choices"][0]["text"]  # same greedy tokens
    ranked = completion(client, model, best_of=2, n=1, temperature=1.0, seed=3)
    assert seen[-1] is True and len(ranked["choices"]) == 1  # best_of ranks by log-probs


def test_tgi_generate(client: httpx.Client, seen: list[bool]) -> None:
    params: dict[str, Any] = {"max_new_tokens": 4}
    plain = client.post("/generate", json={"inputs": "대한민국은", "parameters": params})
    assert plain.status_code == 200 and seen == [False]
    detailed = client.post(
        "/generate", json={"inputs": "대한민국은", "parameters": {**params, "details": True}}
    )
    assert seen[-1] is True
    tokens = detailed.json()["details"]["tokens"]
    assert len(tokens) == 4 and all(t["logprob"] <= 0 for t in tokens)
    assert detailed.json()["generated_text"] == plain.json()["generated_text"]
    events = []
    with client.stream(
        "POST", "/generate_stream", json={"inputs": "대한민국은", "parameters": params}
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert seen[-1] is True  # every streamed token carries its log-prob
    assert all(e["token"]["logprob"] <= 0 for e in events)


def test_several_sequences_keep_them(client: httpx.Client, seen: list[bool]) -> None:
    """num_return_sequences > 1 without details: /generate still ranks the sequences."""
    params = {"max_new_tokens": 3, "do_sample": True, "seed": 1, "num_return_sequences": 2}
    r = client.post("/generate", json={"inputs": "대한민국은", "parameters": params})
    assert r.status_code == 200, r.text
    assert seen == [True]


def test_chat(client: httpx.Client, live_server: LiveServer, seen: list[bool]) -> None:
    body = {
        "model": live_server.state.model_name,
        "messages": [{"role": "user", "content": "안녕"}],
        "max_tokens": 3,
        "temperature": 0,
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    shown = client.post("/v1/chat/completions", json={**body, "logprobs": True})
    assert seen == [False, True]
    content = shown.json()["choices"][0]["logprobs"]["content"]
    assert content and all(c["logprob"] <= 0 for c in content)
