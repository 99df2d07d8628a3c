"""Replaying an output over HTTP (docs/reproducibility.md): on a float32 CPU server with
batch-invariant mode, the same request gives bit-identical tokens and log-probs alone and
among concurrent requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.integration.conftest import LiveServer

PROMPT = "대한민국의 헌법 제1조는 민주공화국을 말한다. 모든 권력은"


def generate(base_url: str, inputs: str, parameters: dict[str, Any]) -> list[tuple[int, float]]:
    body = {"inputs": inputs, "parameters": {**parameters, "details": True}}
    r = httpx.post(f"{base_url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [(t["id"], t["logprob"]) for t in r.json()["details"]["tokens"]]


def test_info_reports_the_mode_and_outputs_replay_under_load(live_server: LiveServer) -> None:
    info = httpx.get(f"{live_server.base_url}/info").json()
    if not info["batch_invariant"]:
        pytest.skip("this server is not batch-invariant (no native kernels here)")
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    url = live_server.base_url
    greedy = {"max_new_tokens": 24}
    seeded = {"max_new_tokens": 24, "do_sample": True, "top_k": 30, "seed": 1234}
    alone = [generate(url, PROMPT, greedy), generate(url, PROMPT, seeded)]
    others = [
        (PROMPT[: 5 + 3 * i] + " 국회", {"max_new_tokens": 8 + i, "do_sample": i % 2 == 1})
        for i in range(12)
    ]
    with ThreadPoolExecutor(16) as pool:
        load = [pool.submit(generate, url, text, params) for text, params in others]
        under_load = [pool.submit(generate, url, PROMPT, p) for p in (greedy, seeded)]
        assert [f.result() for f in under_load] == alone
        for f in load:
            f.result()
