"""Request shapes near the admission limits (hypothesis): what is admitted completes with
every sequence it asked for; what is refused is a 422 naming the limit. Never a 500, never a
stall (each answer comes back within the client's timeout)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import LiveServer, start_server, stop_server

MAX_SEQUENCES = 12  # --max-request-sequences of the server under test


@pytest.fixture(scope="module")
def limited(live_server: LiveServer) -> Iterator[LiveServer]:
    update = {"max_request_sequences": MAX_SEQUENCES}
    server_settings = live_server.state.settings.model_copy(update=update)
    state = dataclasses.replace(live_server.state, settings=server_settings)
    live = start_server(server_settings, state)
    yield live
    stop_server(live)


@st.composite
def shapes(draw: st.DrawFn) -> dict[str, Any]:
    prompts = draw(st.integers(1, 8))
    guidance = draw(st.booleans())  # served with one sequence per prompt
    n = 1 if guidance else draw(st.integers(1, 4))
    best_of = None if guidance else draw(st.one_of(st.none(), st.integers(n, 5)))
    max_tokens = draw(st.integers(1, 4))
    # prompt lengths near the model's 1,024 positions (the total must fit them)
    length = draw(st.sampled_from([3, 1018, 1019, 1020, 1021, 1022, 1023]))
    negative = draw(st.sampled_from([2, 1019, 1020, 1021])) if guidance else 0
    return {
        "prompts": prompts,
        "n": n,
        "best_of": best_of,
        "max_tokens": max_tokens,
        "length": length,
        "negative": negative,
    }


def broken_limits(shape: dict[str, Any]) -> set[str]:
    """The limits a shape breaks (words a 422 names); the server may report any of them."""
    broken = set()
    per_prompt = max(shape["n"], shape["best_of"] or 0) + (1 if shape["negative"] else 0)
    if shape["prompts"] * per_prompt > MAX_SEQUENCES:
        broken.add("--max-request-sequences")
    if shape["length"] + shape["max_tokens"] > 1024:
        broken.add("max_tokens")
    if shape["negative"] and shape["negative"] + shape["max_tokens"] > 1024:
        broken.add("negative_prompt_ids")
    return broken


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(shape=shapes())
def test_admitted_completes_refused_names_the_limit(
    limited: LiveServer, shape: dict[str, Any]
) -> None:
    body: dict[str, Any] = {
        "model": "any",
        "prompt": [[5] * shape["length"] for _ in range(shape["prompts"])],
        "n": shape["n"],
        "max_tokens": shape["max_tokens"],
        "temperature": 1.0,
        "seed": 7,
    }
    if shape["best_of"] is not None:
        body["best_of"] = shape["best_of"]
    if shape["negative"]:
        body["guidance_scale"] = 1.5
        body["negative_prompt_ids"] = [6] * shape["negative"]
    body["model"] = limited.state.model_name
    r = httpx.post(f"{limited.base_url}/v1/completions", json=body, timeout=120)
    broken = broken_limits(shape)
    if not broken:
        assert r.status_code == 200, (shape, r.text)
        choices = r.json()["choices"]
        assert len(choices) == shape["prompts"] * shape["n"], shape
        assert all(c["finish_reason"] in ("length", "stop") for c in choices)
    else:
        assert r.status_code == 400, (shape, r.status_code, r.text)  # /v1: OpenAI's 400
        error = r.json()["error"]
        named = {w for w in broken if w in error["message"] or w == error["param"]}
        assert named, (shape, error)
