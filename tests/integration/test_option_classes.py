"""The option classes over HTTP (docs/options.md): engine-owned and speculative options change
nothing, inapplicable and not-yet options are 422s that name the field and say why, the
output flags turn on details, and output_attentions / output_hidden_states take the exact
lane (transformers' own generate) with the batched lane's tokens."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
import torch

from tests.integration.conftest import LiveServer

PROMPT = "대한민국은"
GREEDY = {"max_new_tokens": 6, "details": True}
SAMPLE = {"max_new_tokens": 6, "do_sample": True, "seed": 11, "top_k": 20, "details": True}
ENGINE_OWNED = {
    "cache_implementation": "static",
    "cache_config": {"max_batch_size": 1},
    "max_cache_len": 64,
    "compile_config": {"fullgraph": True},
    "disable_compile": True,
    "prefill_chunk_size": 8,
    "continuous_batching_config": {"block_size": 32},
    "low_memory": True,
}


def generate(client: httpx.Client, params: dict[str, Any], inputs: str = PROMPT) -> dict:
    r = client.post("/generate", json={"inputs": inputs, "parameters": params})
    assert r.status_code == 200, r.text
    return r.json()


def refused(client: httpx.Client, params: dict[str, Any], path: str = "/generate") -> dict:
    r = client.post(path, json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 422, r.text
    return r.json()


def ids(response: dict) -> list[int]:
    return [t["id"] for t in response["details"]["tokens"]]


def test_no_effect_options_keep_the_output(client: httpx.Client) -> None:
    no_effect = {**ENGINE_OWNED, "use_cache": False, "bos_token_id": 1}
    for base in (GREEDY, SAMPLE):
        assert generate(client, {**base, **no_effect}) == generate(client, base)
    beams = {"max_new_tokens": 5, "num_beams": 2}  # HF's beam search raises for low_memory
    assert generate(client, {**beams, "low_memory": True}) == generate(client, beams)
    body = {"prompt": "국회는", "max_tokens": 5, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()
    extra = client.post("/v1/completions", json={**body, **ENGINE_OWNED}).json()
    assert extra["choices"] == plain["choices"]


def test_prompt_lookup_is_accepted_with_identical_output(client: httpx.Client) -> None:
    """Same tokens and text; log-probs equal up to float rounding (drafts are verified in one
    multi-token attention call instead of single-token ones)."""
    prompt = "대한민국은 민주공화국이다. 대한민국은"
    lookup = {"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 2}
    for base in (GREEDY, SAMPLE):
        fast, plain = generate(client, {**base, **lookup}, prompt), generate(client, base, prompt)
        assert fast["generated_text"] == plain["generated_text"]
        assert ids(fast) == ids(plain)
        for a, b in zip(fast["details"]["tokens"], plain["details"]["tokens"], strict=True):
            assert a["text"] == b["text"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


NOT_APPLICABLE = [
    ("encoder_repetition_penalty", 1.2, "decoder-only"),
    ("encoder_no_repeat_ngram_size", 2, "decoder-only"),
    ("decoder_start_token_id", 1, "decoder-only"),
    ("use_mtp", True, "multi-token prediction"),
    ("num_assistant_tokens", 5, "no draft model"),
    ("num_assistant_tokens_schedule", "heuristic", "no draft model"),
    ("assistant_confidence_threshold", 0.5, "no draft model"),
    ("assistant_lookbehind", 3, "no draft model"),
    ("target_lookbehind", 3, "no draft model"),
    ("assistant_early_exit", 2, "no draft model"),
    ("assistant_ensemble_weight", 0.5, "no draft model"),
    ("is_assistant", True, "no draft model"),
    ("speculation_type", "dflash", "no draft model"),
]


def test_not_applicable_options_name_field_and_reason(client: httpx.Client) -> None:
    for name, value, reason in NOT_APPLICABLE:
        body = refused(client, {name: value})
        assert body["field"] == name and name in body["error"] and reason in body["error"], body
    oai = client.post("/v1/completions", json={"prompt": PROMPT, "use_mtp": True})
    assert oai.status_code == 400 and oai.json()["error"]["param"] == "use_mtp"
    neutral = {"encoder_repetition_penalty": 1.0, "num_assistant_tokens": 20, "is_assistant": False}
    assert generate(client, {**GREEDY, **neutral}) == generate(client, GREEDY)


def test_not_yet_options(client: httpx.Client) -> None:
    # No option is "not yet" now: class B: test_class_b_http.py; grammar, allowed_token_ids:
    # test_grammar_http.py; frequency / presence penalties: test_penalties.py,
    # test_tgi_semantics.py. adapter_id selects a LoRA adapter (test_lora_http.py): one that
    # is not loaded is a 404 naming the field and the served names; the model's own name is
    # the base model.
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "lora-1"}})
    assert r.status_code == 404 and r.json()["field"] == "adapter_id"
    assert "lora-1" in r.json()["error"] and "serves" in r.json()["error"]
    # class-B options at their neutral values are as omitted (plain greedy in the engine)
    neutral = {"num_beam_groups": 1, "diversity_penalty": 0, "penalty_alpha": 0}
    assert generate(client, {**GREEDY, **neutral}) == generate(client, GREEDY)


def test_output_flags_turn_on_details(client: httpx.Client) -> None:
    want = generate(client, GREEDY)
    for flag in ("output_scores", "output_logits", "return_dict_in_generate"):
        assert generate(client, {"max_new_tokens": 6, flag: True}) == want


def test_api_aliases(client: httpx.Client) -> None:
    stop = {"max_new_tokens": 12, "details": True}
    text = generate(client, stop)["generated_text"]
    word = text.split()[1] if len(text.split()) > 1 else text[-1]
    assert generate(client, {**stop, "stop": [word]}) == generate(
        client, {**stop, "stop_strings": [word]}
    )
    assert generate(client, {**SAMPLE, "watermark": True}) == generate(
        client, {**SAMPLE, "watermarking_config": {}}
    )


def test_negative_prompt_text_equals_ids(client: httpx.Client) -> None:
    negative = [t["id"] for t in client.post("/tokenize", json={"inputs": "법률"}).json()]
    base = {**SAMPLE, "guidance_scale": 1.8}
    by_text = generate(client, {**base, "negative_prompt": "법률"})
    assert by_text == generate(client, {**base, "negative_prompt_ids": negative})
    both = refused(client, {**base, "negative_prompt": "법률", "negative_prompt_ids": negative})
    assert both["field"] == "negative_prompt"
    assert refused(client, {**base, "negative_prompt": ""})["field"] == "negative_prompt"


def prompt_len(client: httpx.Client, text: str = PROMPT) -> int:
    return len(client.post("/tokenize", json={"inputs": text}).json())


def shape(nested: Any) -> list[int]:
    dims = []
    while isinstance(nested, list):
        dims.append(len(nested))
        nested = nested[0]
    return dims


def test_exact_lane_greedy_shapes_and_tokens(client: httpx.Client, live_server: LiveServer) -> None:
    config = live_server.state.loaded.config
    layers, heads, hidden = config.n_layer, config.n_head, config.n_embd
    p = prompt_len(client)
    diag = {"output_attentions": True, "output_hidden_states": True}
    normal = generate(client, GREEDY)
    exact = generate(client, {"max_new_tokens": 6, **diag})
    assert exact["generated_text"] == normal["generated_text"]
    assert ids(exact) == ids(normal)
    for got, want in zip(exact["details"]["tokens"], normal["details"]["tokens"], strict=True):
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-4)
    att, hid = exact["details"]["attentions"], exact["details"]["hidden_states"]
    n = len(ids(exact))
    assert len(att) == len(hid) == n
    assert shape(att[0]) == [layers, 1, heads, p, p] and shape(hid[0]) == [layers + 1, 1, p, hidden]
    for t in range(1, n):
        assert shape(att[t]) == [layers, 1, heads, 1, p + t]
        assert shape(hid[t]) == [layers + 1, 1, 1, hidden]
    assert sum(att[-1][0][0][0][0]) == pytest.approx(1.0, abs=1e-4)  # a softmax row
    assert "attentions" not in normal["details"]  # TGI's wire format otherwise
    beams = {"max_new_tokens": 4, "num_beams": 2, "details": True}
    beam_exact = generate(client, {**beams, "output_hidden_states": True})
    assert ids(beam_exact) == ids(generate(client, beams))
    assert shape(beam_exact["details"]["hidden_states"][0])[:2] == [layers + 1, 2]
    for options in ({"token_healing": True}, {"stop": ["바에"], "ignore_eos": True}):
        base = {"max_new_tokens": 5, "details": True, **options}
        want = generate(client, base, "대한민국은 민주공화")
        got = generate(client, {**base, "output_hidden_states": True}, "대한민국은 민주공화")
        assert (ids(got), got["generated_text"]) == (ids(want), want["generated_text"])
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()
    oai = client.post("/v1/completions", json={**body, "output_hidden_states": True}).json()
    assert oai["choices"] == plain["choices"] and len(oai["details"]["hidden_states"]) == n
    listed = client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, **diag}})
    assert listed.json()[0]["details"]["attentions"] == att


def test_exact_lane_seeded_sample_equals_engine(client: httpx.Client) -> None:
    for base in (SAMPLE, {**SAMPLE, "num_return_sequences": 2, "top_p": 0.9}):
        normal = generate(client, base)
        before = torch.random.get_rng_state()
        exact = generate(client, {**base, "output_attentions": True})
        assert torch.equal(before, torch.random.get_rng_state())  # fork_rng: untouched
        assert exact["generated_text"] == normal["generated_text"]
        assert ids(exact) == ids(normal)
        others = normal["details"]["best_of_sequences"] or []
        exact_others = exact["details"]["best_of_sequences"] or []
        assert [ids({"details": o}) for o in exact_others] == [ids({"details": o}) for o in others]


def test_exact_lane_cap_and_streaming_422(client: httpx.Client, live_server: LiveServer) -> None:
    cap = live_server.state.settings.exact_lane_max_floats
    big = {"max_new_tokens": 600, "ignore_eos": True, "output_attentions": True}
    body = refused(client, big)
    assert body["field"] == "output_attentions" and str(cap) in body["error"]
    diag = {"max_new_tokens": 4, "output_hidden_states": True}
    assert refused(client, diag, "/generate_stream")["field"] == "output_hidden_states"
    r = client.post("/", json={"inputs": PROMPT, "parameters": diag, "stream": True})
    assert r.status_code == 422 and r.json()["field"] == "output_hidden_states"
    stream = {"prompt": PROMPT, "max_tokens": 4, "stream": True, "output_attentions": True}
    r = client.post("/v1/completions", json=stream)
    assert r.status_code == 400 and r.json()["error"]["param"] == "output_attentions"
    two = {"prompt": [PROMPT, "국회는"], "max_tokens": 4, "output_attentions": True}
    r = client.post("/v1/completions", json=two)
    assert r.status_code == 400 and r.json()["error"]["param"] == "output_attentions"
    few = {"query": "수도는?", "parameters": {"max_new_tokens": 4, "output_attentions": True}}
    r = client.post("/few-shot", json=few)
    assert r.status_code == 422 and r.json()["field"] == "output_attentions"


def test_run_exclusive_runs_on_the_engine_thread(live_server: LiveServer) -> None:
    engine = live_server.state.engine

    async def calls() -> tuple[str, BaseException | None]:
        name = await engine.run_exclusive(lambda: threading.current_thread().name)
        try:
            await engine.run_exclusive(lambda: 1 // 0)
        except ZeroDivisionError as err:
            return name, err
        return name, None

    name, err = asyncio.run(calls())
    assert name == "kogpt-engine" and isinstance(err, ZeroDivisionError)
