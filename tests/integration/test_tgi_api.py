"""TGI wire format: /generate, /generate_stream, POST /, and the two TGI clients unchanged."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import LiveServer, sse_events

SAMPLED = {"max_new_tokens": 12, "do_sample": True, "top_p": 0.95, "seed": 7}


def stream(client: httpx.Client, path: str, body: dict) -> list:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


def test_stream_concatenates_to_the_non_stream_text(client: httpx.Client) -> None:
    body = {"inputs": "대한민국은", "parameters": {**SAMPLED, "details": True}}
    full = client.post("/generate", json=body).json()
    events = stream(client, "/generate_stream", body)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    final = events[-1]
    assert "".join(e["token"]["text"] for e in events) == full["generated_text"]
    assert final["generated_text"] == full["generated_text"]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in full["details"]["tokens"]]
    details = final["details"]
    assert details["generated_tokens"] == len(events) == full["details"]["generated_tokens"]
    assert details["finish_reason"] == full["details"]["finish_reason"]
    assert details["input_length"] == full["details"]["input_length"] > 0
    assert details["seed"] == 7


def test_stream_text_is_utf8_safe(client: httpx.Client) -> None:
    body = {"inputs": "헌법은", "parameters": {"max_new_tokens": 24, "ignore_eos": True}}
    events = stream(client, "/generate_stream", body)
    text = events[-1]["generated_text"]
    # A token that ends inside a syllable carries "" and the syllable comes whole later.
    if "\ufffd" not in text:
        assert not any("\ufffd" in e["token"]["text"] for e in events)
    assert "".join(e["token"]["text"] for e in events) == text


def test_compat_route_streams_on_request(client: httpx.Client) -> None:
    body = {"inputs": "국민은", "parameters": {"max_new_tokens": 6}}
    listed = client.post("/", json=body).json()
    assert isinstance(listed, list) and len(listed) == 1
    events = stream(client, "/", {**body, "stream": True})
    assert events[-1]["generated_text"] == listed[0]["generated_text"]
    r = client.post("/generate", json={**body, "stream": True})
    assert r.status_code == 422 and r.json()["field"] == "stream"


def test_details_options(client: httpx.Client) -> None:
    prompt = "대한민국의 주권은 국민에게 있고"
    base = {"max_new_tokens": 5, "details": True}
    ids = client.post("/tokenize", json={"inputs": prompt}).json()
    r = client.post(
        "/generate",
        json={"inputs": prompt, "parameters": {**base, "decoder_input_details": True}},
    ).json()
    assert [t["id"] for t in r["details"]["prefill"]] == [t["id"] for t in ids]
    full = client.post(
        "/generate", json={"inputs": prompt, "parameters": {**base, "return_full_text": True}}
    ).json()
    assert full["generated_text"] == prompt + r["generated_text"]
    by_ids = client.post(
        "/generate", json={"input_ids": [t["id"] for t in ids], "parameters": base}
    ).json()
    assert by_ids["generated_text"] == r["generated_text"]
    cut = client.post(
        "/generate", json={"inputs": prompt, "parameters": {**base, "truncate": 3}}
    ).json()
    assert cut["details"]["input_length"] == 3


def test_text_generation_client(live_server: LiveServer) -> None:
    tg = pytest.importorskip("text_generation")
    client = tg.Client(live_server.base_url, timeout=60)
    response = client.generate("대한민국은", max_new_tokens=10, do_sample=True, seed=3)
    assert response.details.generated_tokens == len(response.details.tokens) <= 10
    assert response.details.finish_reason in ("length", "eos_token")
    chunks = list(client.generate_stream("대한민국은", max_new_tokens=10, do_sample=True, seed=3))
    assert "".join(c.token.text for c in chunks) == response.generated_text
    assert chunks[-1].generated_text == response.generated_text
    assert chunks[-1].details.generated_tokens == response.details.generated_tokens
    with pytest.raises(tg.errors.ValidationError, match="max_new_tokens"):
        client.generate("대한민국은", max_new_tokens=5000)


def test_huggingface_hub_inference_client(live_server: LiveServer) -> None:
    from huggingface_hub import InferenceClient

    hub = InferenceClient(base_url=live_server.base_url, timeout=60)
    options = {"max_new_tokens": 10, "do_sample": True, "seed": 5}
    text = hub.text_generation("모든 국민은", **options)
    assert isinstance(text, str)
    detailed = hub.text_generation("모든 국민은", details=True, **options)
    assert detailed.generated_text == text
    assert detailed.details.generated_tokens == len(detailed.details.tokens)
    assert "".join(hub.text_generation("모든 국민은", stream=True, **options)) == text
    events = list(hub.text_generation("모든 국민은", stream=True, details=True, **options))
    assert events[-1].generated_text == text
    assert events[-1].details.finish_reason in ("length", "eos_token")
    with pytest.raises(Exception, match="top_p"):
        hub.text_generation("모든 국민은", max_new_tokens=4, top_p=1.5)


def test_best_of(client: httpx.Client) -> None:
    """best_of maps to num_return_sequences; runs once the engine serves n > 1."""
    params = {"max_new_tokens": 5, "do_sample": True, "best_of": 2, "details": True}
    r = client.post("/generate", json={"inputs": "국민은", "parameters": params})
    if client.get("/info").json()["max_best_of"] < 2:
        assert r.status_code == 422 and r.json()["field"] == "best_of"
        return
    assert r.status_code == 200, r.text
    assert len(r.json()["details"]["best_of_sequences"]) == 1
    r = client.post("/generate_stream", json={"inputs": "국민은", "parameters": params})
    assert r.status_code == 422 and r.json()["field"] == "best_of"


def test_beam_search_token_texts(client: httpx.Client) -> None:
    """Beam results arrive whole; their text is still shared out token by token."""
    params = {"max_new_tokens": 6, "num_beams": 2, "details": True}
    r = client.post("/generate", json={"inputs": "대한민국은", "parameters": params})
    if r.status_code == 422 and r.json()["field"] == "num_beams":
        pytest.skip("the engine does not serve beam search yet")
    out = r.json()
    texts = [t["text"] for t in out["details"]["tokens"]]
    assert "".join(texts) == out["generated_text"]
    assert sum(bool(t) for t in texts) > 1
    events = stream(client, "/generate_stream", {"inputs": "대한민국은", "parameters": params})
    assert "".join(e["token"]["text"] for e in events) == out["generated_text"]
