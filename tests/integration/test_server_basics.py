"""/health, /info, /ready and /generate on a live uvicorn server with the embedded model."""

from __future__ import annotations

import concurrent.futures

import httpx
import torch
import transformers

from app.engine.transformers_version import MATCHED_TRANSFORMERS
from tests.integration.conftest import LiveServer


def test_health(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_ready(client: httpx.Client) -> None:
    assert client.get("/ready").json() == {"status": "ready"}


def test_info_reports_model_and_limits(client: httpx.Client) -> None:
    info = client.get("/info").json()
    assert info["model_type"] == "gpt2"
    assert info["config"]["n_positions"] == 1024
    assert info["max_total_tokens"] == 1024 and info["max_input_tokens"] == 1023
    assert info["kv_cache"]["num_blocks"] == 512
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    # float32 CPU: the C kernel reads the paged blocks in place (CUDA: "triton")
    assert info["decode_kernel"] == ("native" if info["native_kernels"] else None)
    assert info["linear_backend"] in ("aten", "mkldnn")
    assert info["generate_matches_transformers"] == MATCHED_TRANSFORMERS
    assert info["max_request_sequences"] == 1024
    assert info["transformers_version"] == transformers.__version__


def test_generate_greedy_equals_model_generate(
    client: httpx.Client, live_server: LiveServer
) -> None:
    r = client.post(
        "/generate", json={"inputs": "대한민국은", "parameters": {"max_new_tokens": 16}}
    )
    assert r.status_code == 200, r.text
    text = r.json()["generated_text"]
    state = live_server.state
    tok, model = state.tokenizer, state.loaded.model
    ids = torch.tensor([tok("대한민국은")["input_ids"]])
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16)
    assert text == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert any("\uac00" <= ch <= "\ud7a3" for ch in text), "expected Hangul in the continuation"


def test_generate_details(client: httpx.Client) -> None:
    body = {
        "inputs": "국민은",
        "parameters": {"max_new_tokens": 5, "details": True, "seed": 1, "do_sample": True},
    }
    details = client.post("/generate", json=body).json()["details"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 5
    assert details["finish_reason"] in {"length", "eos_token"} and details["seed"] == 1
    assert all(t["logprob"] <= 0 for t in details["tokens"])


def test_seeded_sampling_is_reproducible(client: httpx.Client) -> None:
    body = {"inputs": "법률은", "parameters": {"max_new_tokens": 12, "do_sample": True, "seed": 42}}
    texts = {client.post("/generate", json=body).json()["generated_text"] for _ in range(2)}
    assert len(texts) == 1


def test_concurrent_requests_all_complete(live_server: LiveServer) -> None:
    def call(i: int) -> str:
        body = {
            "inputs": f"제{i}조",
            "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": i},
        }
        r = httpx.post(f"{live_server.base_url}/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["generated_text"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(call, range(16)))
    assert batched[3] == call(3)  # a seeded request is the same alone and in a busy batch
    live_server.wait_idle()
    engine = live_server.state.engine.engine
    engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_errors_name_the_field(client: httpx.Client) -> None:
    cases = [
        ({"inputs": "a", "parameters": {"temperature": -1}}, "temperature"),
        ({"inputs": "a", "parameters": {"top_p": 1.5}}, "top_p"),
        ({"inputs": "a", "parameters": {"max_new_tokens": 5000}}, "max_new_tokens"),
        ({"inputs": "a", "parameters": {"tempurature": 1}}, "tempurature"),
        ({"inputs": "", "parameters": {}}, "inputs"),
        ({"inputs": "가" * 3000, "parameters": {}}, "inputs"),
    ]
    for body, field in cases:
        r = client.post("/generate", json=body)
        assert r.status_code == 422, (body, r.text)
        err = r.json()
        assert field in err["field"] and field in err["error"], err
