"""Class-B decoding methods over HTTP: contrastive search, group beam search, DoLa and
constrained beam search on POST /generate, /generate_stream and /v1/completions, the same
tokens as the method run directly on the served model, and their 422s."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest

from app.api.serving import build_params
from app.engine.lanes.class_b.runner import run_method
from app.options.class_b import ClassBParams
from tests.integration.conftest import LiveServer, sse_events

PROMPT = "대한민국은 민주공화국이다"
METHODS: dict[str, dict[str, Any]] = {
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 12},
    "group_beam": {
        "num_beams": 4,
        "num_beam_groups": 2,
        "diversity_penalty": 1.0,
        "num_return_sequences": 2,
        "max_new_tokens": 10,
    },
    "dola": {"dola_layers": "high", "repetition_penalty": 1.2, "max_new_tokens": 12},
    "dola_sampling": {
        "dola_layers": [0, 2],
        "do_sample": True,
        "seed": 5,
        "top_k": 20,
        "max_new_tokens": 12,
    },
    "constrained": {
        "force_words": [" 법률", [" 자유", " 권리"]],
        "num_beams": 4,
        "max_new_tokens": 14,
    },
}


def direct(live: LiveServer, options: dict[str, Any]) -> list[list[int]]:
    """The method run on the served model itself, on the engine thread (its one owner)."""
    state = live.state
    ids = list(state.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    params = build_params(state, dict(options), len(ids))
    assert isinstance(params, ClassBParams)
    model, tokenizer = state.loaded.model, state.tokenizer
    job = state.engine.run_exclusive(lambda: run_method(model, ids, params, tokenizer))
    return [tokens for tokens, _ in asyncio.run(job)]


def tgi(client: httpx.Client, options: dict[str, Any], path: str = "/generate") -> httpx.Response:
    return client.post(path, json={"inputs": PROMPT, "parameters": {**options, "details": True}})


def token_ids(details: dict[str, Any]) -> list[int]:
    return [t["id"] for t in details["tokens"]]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_over_generate_and_completions(
    client: httpx.Client, live_server: LiveServer, method: str
) -> None:
    options = METHODS[method]
    expected = direct(live_server, options)
    r = tgi(client, options)
    assert r.status_code == 200, r.text
    out = r.json()
    details = out["details"]
    sequences = [token_ids(details)] + [token_ids(s) for s in details["best_of_sequences"] or []]
    assert sequences == expected
    assert details["finish_reason"] == "length" and details["generated_tokens"] == len(expected[0])
    if method in ("contrastive", "dola", "dola_sampling"):  # token by token: logprobs
        assert all(t["logprob"] is not None and t["logprob"] <= 0 for t in details["tokens"])
    if method == "constrained":
        assert " 법률" in " " + out["generated_text"]
        assert any(w in " " + out["generated_text"] for w in (" 자유", " 권리"))

    n = options.get("num_return_sequences", 1)
    body = {"prompt": PROMPT, "max_tokens": options["max_new_tokens"], "n": n, "temperature": 0}
    extra = {
        k: v for k, v in options.items() if k not in ("max_new_tokens", "num_return_sequences")
    }
    if options.get("do_sample"):
        body["temperature"] = 1.0
    r = client.post("/v1/completions", json={**body, **extra})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    tokenizer = live_server.state.tokenizer
    assert texts == [tokenizer.decode(s, skip_special_tokens=True) for s in expected]
    assert r.json()["usage"]["completion_tokens"] == sum(len(s) for s in expected)


@pytest.mark.parametrize("method", ["contrastive", "constrained"])
def test_streaming_gives_the_same_tokens(client: httpx.Client, method: str) -> None:
    """Token-by-token methods stream each token as it is chosen; beam methods stream their
    result once the search ends. Either way the stream carries the non-streamed tokens."""
    options = METHODS[method]
    whole = tgi(client, options).json()
    stream = {"inputs": PROMPT, "parameters": options}
    with client.stream("POST", "/generate_stream", json=stream) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    assert [e["token"]["id"] for e in events] == token_ids(whole["details"])
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"]
    assert events[-1]["generated_text"] == whole["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "length"
    body = {"prompt": PROMPT, "max_tokens": options["max_new_tokens"], "temperature": 0}
    extra = {k: v for k, v in options.items() if k != "max_new_tokens"}
    with client.stream("POST", "/v1/completions", json={**body, **extra, "stream": True}) as r:
        chunks = [c for c in sse_events(r.iter_lines()) if c != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["generated_text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_and_eos_end_a_class_b_request(client: httpx.Client) -> None:
    options = {**METHODS["contrastive"], "max_new_tokens": 30}
    text = tgi(client, options).json()["generated_text"]
    stop = text.split()[1]
    out = tgi(client, {**options, "stop": [stop]}).json()
    assert out["details"]["finish_reason"] == "stop_sequence"
    # TGI routes keep the stop sequence in the text (TGI, generate(stop_strings=)).
    assert stop in out["generated_text"] and text.startswith(out["generated_text"])
    last = out["details"]["tokens"][-1]["id"]
    eos = tgi(client, {**options, "eos_token_id": last}).json()["details"]
    assert eos["finish_reason"] == "eos_token" and token_ids(eos)[-1] == last


def test_other_requests_run_while_a_class_b_request_does(
    client: httpx.Client, live_server: LiveServer
) -> None:
    """A class-B request runs one step at a time between batch steps: a long one and plain
    requests sent meanwhile all return what each returns alone."""
    long = {**METHODS["contrastive"], "max_new_tokens": 40}
    plain = {"max_new_tokens": 8}
    alone = (tgi(client, long).json(), tgi(client, plain).json())
    results: dict[str, Any] = {}

    def send(name: str, options: dict[str, Any]) -> None:
        with httpx.Client(base_url=live_server.base_url, timeout=120) as c:
            results[name] = tgi(c, options).json()

    threads = [threading.Thread(target=send, args=("long", long))]
    threads += [threading.Thread(target=send, args=(f"plain{i}", plain)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["long"] == alone[0]  # logprobs included: it ran alone each step
    for i in range(3):  # batched in float32: the same tokens (logprobs may differ in the ulp)
        assert token_ids(results[f"plain{i}"]["details"]) == token_ids(alone[1]["details"])


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"penalty_alpha": 1.5}, "penalty_alpha", "[0, 1]"),
        ({"penalty_alpha": 0.5, "top_k": 1}, "top_k", "top_k"),
        ({"penalty_alpha": 0.5, "do_sample": True}, "penalty_alpha", "do_sample"),
        (
            {"num_beam_groups": 3, "diversity_penalty": 1.0, "num_beams": 4},
            "num_beam_groups",
            "divide",
        ),
        ({"num_beam_groups": 2, "num_beams": 4}, "diversity_penalty", "> 0"),
        ({"dola_layers": [9]}, "dola_layers", "[0, 4)"),
        ({"dola_layers": "low", "num_beams": 2}, "dola_layers", "num_beams"),
        ({"force_words_ids": [[5]]}, "force_words_ids", "num_beams > 1"),
        ({"force_words_ids": [[99999]], "num_beams": 2}, "force_words_ids", "< 3262"),
        ({"force_words": [""], "num_beams": 2}, "force_words", "non-empty"),
        ({"constraints": [{"type": "regex"}], "num_beams": 2}, "constraints", "phrasal"),
        ({"penalty_alpha": 0.5, "dola_layers": "low"}, "dola_layers", "different"),
        ({"penalty_alpha": 0.5, "output_attentions": True}, "output_attentions", "class-B"),
    ],
)
def test_invalid_class_b_options_are_422(
    client: httpx.Client, options: dict[str, Any], field: str, words: str
) -> None:
    r = tgi(client, options)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["error"], r.json()


def test_completions_400_names_the_field(client: httpx.Client) -> None:
    """temperature defaults to 1 on /v1 (sampling): contrastive search needs temperature 0."""
    r = client.post("/v1/completions", json={"prompt": PROMPT, "penalty_alpha": 0.6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "penalty_alpha"
    r = client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, "top_k": 1,
                                              "penalty_alpha": 0.6})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


def test_rows_are_bounded_by_max_num_seqs(client: httpx.Client, live_server: LiveServer) -> None:
    """Beams, and contrastive search's top_k candidates, are model rows per step: like a
    plain beam request, more than --max-num-seqs of them is a 422."""
    cap = live_server.state.settings.max_num_seqs
    for options in (
        {"penalty_alpha": 0.5, "top_k": cap + 1, "max_new_tokens": 2},
        {"num_beams": cap + 2, "num_beam_groups": 2, "diversity_penalty": 1.0, "max_new_tokens": 2},
    ):
        r = tgi(client, options)
        assert r.status_code == 422 and "max_num_seqs" in r.json()["error"], r.text
