"""Prompt log-probs over HTTP, in the three shapes clients read: OpenAI's echo + logprobs
(what lm-eval's local-completions sums), vLLM's prompt_logprobs (completions and chat) and
TGI's decoder_input_details. Values are checked against transformers' model (float32: 1e-4)."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
import torch

from tests.integration.conftest import LiveServer, sse_events

PROMPT = "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."
TOL = 1e-4


def encode(live: LiveServer, text: str) -> list[int]:
    return list(live.state.tokenizer(text, add_special_tokens=False)["input_ids"])


def reference(live: LiveServer, ids: list[int]) -> torch.Tensor:
    """log_softmax of GPT2LMHeadModel's logits: row p is token p + 1's distribution."""
    model = live.state.loaded.model
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=model.device)).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def check_echo(live: LiveServer, ids: list[int], logprobs: dict[str, Any], k: int) -> None:
    """OpenAI's echoed prompt: the first token null, then real values and k alternatives."""
    ref = reference(live, ids)
    decode = live.state.tokenizer.decode
    assert logprobs["tokens"][: len(ids)] == [decode([t]) for t in ids]
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    for p in range(1, len(ids)):
        assert abs(logprobs["token_logprobs"][p] - float(ref[p - 1, ids[p]])) <= TOL
        top = logprobs["top_logprobs"][p]
        assert len(top) == k
        assert abs(max(top.values()) - float(ref[p - 1].max())) <= TOL


@pytest.mark.parametrize("max_tokens", [0, 1, 3])
def test_completions_echo_logprobs(
    client: httpx.Client, live_server: LiveServer, max_tokens: int
) -> None:
    ids = encode(live_server, PROMPT)
    body = {
        "prompt": PROMPT,
        "echo": True,
        "logprobs": 2,
        "max_tokens": max_tokens,
        "n": 2,
        "seed": 7,
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2
    for choice in choices:
        lp = choice["logprobs"]
        check_echo(live_server, ids, lp, 2)
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert all(v is not None for v in lp["token_logprobs"][len(ids) :])
        assert choice["text"].startswith(PROMPT)
        assert "prompt_logprobs" not in choice or choice["prompt_logprobs"] is None
    assert r.json()["usage"]["completion_tokens"] == 2 * max_tokens


def test_token_id_prompts_as_lm_eval_sends_them(
    client: httpx.Client, live_server: LiveServer
) -> None:
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs 1, max_tokens 1;
    it sums token_logprobs[ctxlen:-1] and checks each against max(top_logprobs)."""
    prompts = [encode(live_server, PROMPT), encode(live_server, "국회는 법률을 제정한다.")]
    body = {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for ids, choice in zip(prompts, r.json()["choices"], strict=True):
        check_echo(live_server, ids, choice["logprobs"], 1)
        ref = reference(live_server, ids)
        expected = sum(float(ref[p - 1, ids[p]]) for p in range(3, len(ids)))
        assert abs(sum(choice["logprobs"]["token_logprobs"][3:-1]) - expected) <= 1e-3


@pytest.mark.parametrize("max_tokens", [0, 2])
def test_completions_echo_logprobs_streamed(
    client: httpx.Client, live_server: LiveServer, max_tokens: int
) -> None:
    ids = encode(live_server, PROMPT)
    body = {
        "prompt": PROMPT, "echo": True, "logprobs": 3, "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "prompt_logprobs": 1,
    }  # fmt: skip
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    chunks = [c for e in events for c in e["choices"]]
    first = chunks[0]
    assert first["text"] == PROMPT
    check_echo(live_server, ids, first["logprobs"], 3)
    check_vllm(live_server, ids, first["prompt_logprobs"], 1)  # vLLM's, on the first chunk
    generated = [t for c in chunks[1:] for t in c["logprobs"]["tokens"]]
    assert len(generated) == max_tokens
    assert chunks[-1]["finish_reason"] == "length"


def check_vllm(live: LiveServer, ids: list[int], prompt_logprobs: list[Any], k: int) -> None:
    """vLLM's shape: None, then {token id: {logprob, rank, decoded_token}}, the prompt's own
    token first, then the k most likely (ranks 1..k)."""
    ref = reference(live, ids)
    assert len(prompt_logprobs) == len(ids)
    assert prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        row = ref[p - 1]
        entries = prompt_logprobs[p]
        own = entries[str(ids[p])]
        assert next(iter(entries)) == str(ids[p])
        assert abs(own["logprob"] - float(row[ids[p]])) <= TOL
        # 1 + the tokens at least as likely (float32 rounding: near-ties either way)
        value = row[ids[p]]
        assert int((row > value + TOL).sum()) + 1 <= own["rank"] <= int((row >= value - TOL).sum())
        assert own["decoded_token"] == live.state.tokenizer.decode([ids[p]])
        others = {int(t): e for t, e in entries.items() if int(t) != ids[p]}
        assert len(others) in (k - 1, k) if k else not others
        kth = float(torch.topk(row, k).values[-1]) if k else 0.0
        for token, entry in others.items():
            assert abs(entry["logprob"] - float(row[token])) <= TOL
            assert entry["logprob"] >= kth - TOL
            assert 1 <= entry["rank"] <= k


@pytest.mark.parametrize("k", [0, 2])
def test_vllm_prompt_logprobs_on_completions(
    client: httpx.Client, live_server: LiveServer, k: int
) -> None:
    ids = encode(live_server, PROMPT)
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "prompt_logprobs": k}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["logprobs"] is None
    check_vllm(live_server, ids, choice["prompt_logprobs"], k)


def test_vllm_prompt_logprobs_on_chat(client: httpx.Client, live_server: LiveServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "대한민국의 수도는?"}],
        "max_tokens": 2,
        "temperature": 0,
        "prompt_logprobs": 1,
        "return_token_ids": True,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    ids = data["prompt_token_ids"]
    assert len(ids) == data["usage"]["prompt_tokens"]
    check_vllm(live_server, ids, data["prompt_logprobs"], 1)
    # vLLM refuses them in a chat stream (its chunks have no place for them)
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


def test_tgi_decoder_input_details(client: httpx.Client, live_server: LiveServer) -> None:
    ids = encode(live_server, PROMPT)
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 2, "details": True, "decoder_input_details": True},
    }
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    prefill = r.json()["details"]["prefill"]
    ref = reference(live_server, ids)
    assert [t["id"] for t in prefill] == ids
    assert prefill[0]["logprob"] is None
    for p in range(1, len(ids)):
        assert abs(prefill[p]["logprob"] - float(ref[p - 1, ids[p]])) <= TOL
        assert math.isfinite(prefill[p]["logprob"])


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_out_of_range(client: httpx.Client, route: str) -> None:
    body: dict[str, Any] = {"max_tokens": 1, "prompt_logprobs": 21}
    if route == "/v1/completions":
        body["prompt"] = PROMPT
    else:
        body["messages"] = [{"role": "user", "content": "안녕"}]
    r = client.post(route, json=body)
    assert 400 <= r.status_code < 500
    assert "prompt_logprobs" in r.text


@pytest.mark.parametrize(
    "extra",
    [{}, {"num_beams": 3}, {"penalty_alpha": 0.6, "top_k": 4}],
    ids=["plain", "beams", "contrastive"],
)
@pytest.mark.parametrize("max_tokens", [0, 2])
def test_any_decoding_method(
    client: httpx.Client, live_server: LiveServer, extra: dict[str, Any], max_tokens: int
) -> None:
    """Beams and class-B methods (an exclusive lane: one forward of transformers' model) get
    the same prompt log-probs; with max_tokens 0 nothing is decoded at all."""
    ids = encode(live_server, PROMPT)
    body = {
        "prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
        "temperature": 0, "prompt_logprobs": 2, **extra,
    }  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    check_echo(live_server, ids, choice["logprobs"], 1)
    check_vllm(live_server, ids, choice["prompt_logprobs"], 2)
    assert len(choice["logprobs"]["tokens"]) == len(ids) + max_tokens
