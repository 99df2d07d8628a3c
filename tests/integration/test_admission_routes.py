"""Request shapes near the admission limits on /generate, /v1/chat/completions and /few-shot
(hypothesis; /v1/completions is test_admission_properties.py): sequences (best_of / n,
num_beams, guidance's extra branch), the context, constrained beam search's constraint work,
contrastive search's top_k x positions, DoLa's layers x vocab. What is admitted completes
with every sequence it asked for; what is refused is a 4xx naming a limit it breaks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import LiveServer, start_server, stop_server

MAX_SEQUENCES = 6  # --max-request-sequences
MAX_CONSTRAINT_WORK = 12  # constraint tokens x num_beams
MAX_CONTRASTIVE_WORK = 300  # top_k x positions; these prompts have 2 to 60 positions
DOLA_LAYERS = 3  # --max-dola-work is this many layers x the vocabulary
PROMPT = "대한민국은"
ROUTES = ["/generate", "/v1/chat/completions", "/few-shot"]


@pytest.fixture(scope="module")
def limited(live_server: LiveServer) -> Iterator[LiveServer]:
    vocab = int(live_server.state.loaded.config.vocab_size)
    update = {
        "max_request_sequences": MAX_SEQUENCES,
        "max_constraint_work": MAX_CONSTRAINT_WORK,
        "max_contrastive_work": MAX_CONTRASTIVE_WORK,
        "max_dola_work": DOLA_LAYERS * vocab,
    }
    server_settings = live_server.state.settings.model_copy(update=update)
    state = dataclasses.replace(live_server.state, settings=server_settings)
    live = start_server(server_settings, state)
    yield live
    stop_server(live)


@st.composite
def shapes(draw: st.DrawFn) -> dict[str, Any]:
    """A method, its size near its limit, and the new tokens (1-3, or past the context)."""
    method = draw(st.sampled_from(["sampling", "beams", "guidance", "constrained",
                                   "contrastive", "dola"]))  # fmt: skip
    new_tokens = draw(st.sampled_from([1, 2, 3, 3, 1023, 1100]))
    shape: dict[str, Any] = {"method": method, "new_tokens": new_tokens}
    if method == "sampling":
        shape["sequences"] = draw(st.integers(1, MAX_SEQUENCES + 2))
    elif method == "beams":
        shape["beams"] = draw(st.integers(2, MAX_SEQUENCES + 2))
    elif method == "constrained":
        shape["beams"] = draw(st.integers(2, 8))
        length = draw(st.integers(1, 2))
        count = draw(st.integers(1, 3))
        shape["words"] = [[30 + 7 * w + t for t in range(length)] for w in range(count)]
    elif method == "contrastive":
        shape["top_k"] = draw(st.sampled_from([2, 4, 40, 150, 256]))
    else:
        shape["layers"] = draw(st.lists(st.integers(0, 3), min_size=1, max_size=6))
    return shape


def broken_limits(shape: dict[str, Any]) -> tuple[set[str], bool]:
    """(words naming each limit the shape breaks, whether the verdict is certain): a
    contrastive top_k of 40 may or may not pass, by the route's prompt length."""
    broken: set[str] = set()
    certain = True
    if shape["new_tokens"] > 1000:  # the prompt has at least 2 tokens: past 1,024 positions
        broken.add("max_new_tokens")
        broken.add("max_tokens")
    method = shape["method"]
    sequences = shape.get("sequences", shape.get("beams", 1)) + (method == "guidance")
    if sequences > MAX_SEQUENCES:
        broken.add("--max-request-sequences")
    if method == "constrained":
        tokens = sum(len(w) for w in shape["words"])
        if tokens * shape["beams"] > MAX_CONSTRAINT_WORK:
            broken.add("--max-constraint-work")
    if method == "contrastive":
        top_k = shape["top_k"]
        if top_k * 2 > MAX_CONTRASTIVE_WORK:
            broken.add("--max-contrastive-work")
        elif top_k * 63 > MAX_CONTRASTIVE_WORK:
            certain = False
    if method == "dola" and len(shape["layers"]) > DOLA_LAYERS:
        broken.add("--max-dola-work")
    return broken, certain


def options(shape: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The shape's generate options (chat: OpenAI's names where they differ)."""
    method = shape["method"]
    out: dict[str, Any] = {}
    if method == "sampling":
        if chat:
            out.update(n=shape["sequences"], temperature=1.0, seed=3)
        else:
            out.update(best_of=shape["sequences"], do_sample=True, seed=3)
        return out
    if chat:
        out["temperature"] = 0.0
    if method == "beams":
        out["num_beams"] = shape["beams"]
    elif method == "guidance":  # one sequence and its negative branch (no beams)
        out["guidance_scale"] = 1.5
    elif method == "constrained":
        out.update(num_beams=shape["beams"], force_words_ids=shape["words"])
    elif method == "contrastive":
        out.update(penalty_alpha=0.6, top_k=shape["top_k"])
    else:
        out["dola_layers"] = shape["layers"]
    return out


def request(route: str, shape: dict[str, Any], model: str) -> dict[str, Any]:
    chat = route == "/v1/chat/completions"
    opts = options(shape, chat)
    if chat:
        messages = [{"role": "user", "content": PROMPT}]
        return {"model": model, "messages": messages, "max_tokens": shape["new_tokens"], **opts}
    parameters = {"max_new_tokens": shape["new_tokens"], **opts}
    if route == "/generate":
        return {"inputs": PROMPT, "parameters": {**parameters, "details": True}}
    return {"query": PROMPT, "parameters": parameters}


def check_completed(route: str, shape: dict[str, Any], data: dict[str, Any]) -> None:
    if route == "/v1/chat/completions":
        expected = shape.get("sequences", 1)
        assert len(data["choices"]) == expected, (shape, data)
        assert all(c["finish_reason"] in ("length", "stop") for c in data["choices"]), data
    elif route == "/generate":
        details = data["details"]
        assert details["finish_reason"] in ("length", "eos_token", "stop_sequence"), data
        assert details["generated_tokens"] <= shape["new_tokens"], data
        if shape["method"] == "sampling" and shape["sequences"] > 1:
            assert len(details["best_of_sequences"]) == shape["sequences"] - 1, data
    else:
        assert data["finish_reason"] in ("length", "eos_token", "stop_sequence"), data
        assert data["generated_tokens"] <= shape["new_tokens"], data


@pytest.mark.parametrize("route", ROUTES)
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(shape=shapes())
def test_admitted_completes_refused_names_the_limit(
    limited: LiveServer, route: str, shape: dict[str, Any]
) -> None:
    body = request(route, shape, limited.state.model_name)
    r = httpx.post(f"{limited.base_url}{route}", json=body, timeout=120)
    broken, certain = broken_limits(shape)
    if r.status_code == 200:
        assert not broken, (shape, r.text)
        check_completed(route, shape, r.json())
        return
    # /v1 refuses as OpenAI does (400), the TGI-style routes with TGI's 422
    expected = 400 if route.startswith("/v1/") else 422
    assert r.status_code == expected, (shape, r.status_code, r.text)
    error = r.json()["error"]
    message, field = (
        (error["message"], error["param"]) if isinstance(error, dict) else (error, None)
    )
    field = field if field is not None else r.json().get("field")
    if not broken:
        assert not certain, (shape, r.text)  # only contrastive's uncertain band may refuse
        assert "--max-contrastive-work" in message, (shape, r.text)
        return
    named = {w for w in broken if w in message or w == field}
    assert named, (shape, r.text)
