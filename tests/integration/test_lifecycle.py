"""Disconnects free KV blocks at once, concurrency, metrics, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.integration.conftest import LiveServer, metric, sse_events
from tests.server_process import start_server

LONG = {"max_new_tokens": 900, "ignore_eos": True}


def assert_all_blocks_free(live: LiveServer) -> None:
    live.wait_idle()
    engine = live.state.engine.engine
    engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def aborted(client: httpx.Client, endpoint: str) -> float:
    text = client.get("/metrics").text
    return metric(text, "kogpt_request_finish_total", endpoint=endpoint, finish_reason="abort")


def test_stream_disconnect_aborts_and_frees_blocks(
    client: httpx.Client, live_server: LiveServer
) -> None:
    before = aborted(client, "/generate_stream")
    body = {"inputs": "대한민국은", "parameters": LONG}
    started = time.monotonic()
    with client.stream("POST", "/generate_stream", json=body) as r:
        events = sse_events(r.iter_lines())
        first = [next(events) for _ in range(3)]
        assert [e["index"] for e in first] == [1, 2, 3]
        assert live_server.state.engine.engine.kv.num_free_blocks < 512
    assert_all_blocks_free(live_server)
    assert time.monotonic() - started < 30
    assert aborted(client, "/generate_stream") == before + 1


def test_openai_stream_disconnect_frees_blocks(
    client: httpx.Client, live_server: LiveServer
) -> None:
    body = {"prompt": ["국민은", "국회는"], "max_tokens": 900, "stream": True, "ignore_eos": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r.iter_lines())
        assert next(events)["choices"]
    assert_all_blocks_free(live_server)


def test_non_stream_disconnect_aborts(client: httpx.Client, live_server: LiveServer) -> None:
    before = aborted(client, "/generate")
    body = {"inputs": "모든 국민은", "parameters": LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.base_url}/generate", json=body, timeout=0.5)
    assert_all_blocks_free(live_server)
    assert aborted(client, "/generate") == before + 1


def test_concurrent_mixed_requests(live_server: LiveServer) -> None:
    url = live_server.base_url

    def one(i: int) -> str:
        params = {"max_new_tokens": 8, "seed": i, "do_sample": True}
        body = {"inputs": f"제{i}조", "parameters": params}
        if i % 2:
            with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
                return list(sse_events(r.iter_lines()))[-1]["generated_text"]
        return httpx.post(f"{url}/generate", json=body, timeout=60).json()["generated_text"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        texts = list(pool.map(one, range(12)))
    assert texts[5] == one(5) and texts[4] == one(4)  # same seed, alone or batched
    assert_all_blocks_free(live_server)


def test_metrics_move(client: httpx.Client, live_server: LiveServer) -> None:
    before = client.get("/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    body = {"inputs": "헌법", "parameters": {"max_new_tokens": 6, "ignore_eos": True}}
    assert client.post("/generate", json=body).status_code == 200
    bad = {"inputs": "x", "parameters": {"top_k": -1}}
    assert client.post("/generate", json=bad).status_code == 422
    after = client.get("/metrics").text
    prev = before.text
    model = live_server.state.model_name

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(prev, name, **labels)

    assert delta("kogpt_requests_total", endpoint="/generate", status="200", model=model) == 1
    assert delta("kogpt_requests_total", endpoint="/generate", status="422") == 1
    assert delta("kogpt_request_finish_total", endpoint="/generate", finish_reason="length") == 1
    assert delta("kogpt_time_to_first_token_seconds_count", endpoint="/generate") == 1
    assert delta("kogpt_inter_token_latency_seconds_count", endpoint="/generate") == 5
    assert delta("kogpt_request_latency_seconds_count", endpoint="/generate") == 2
    assert delta("kogpt_generation_tokens_total") == 6
    assert delta("kogpt_request_prompt_tokens_count", endpoint="/generate") == 1
    assert delta("kogpt_prompt_tokens_total") > 0
    assert delta("kogpt_batch_size_count") >= 6
    assert delta("kogpt_engine_steps_total") >= 6
    for gauge in ("kogpt_requests_running", "kogpt_requests_waiting", "kogpt_kv_cache_usage_ratio"):
        assert f"{gauge}{{" in after
    assert metric(after, "kogpt_preemptions_total") >= 0
    assert metric(after, "kogpt_kv_cache_blocks") == live_server.state.engine.engine.kv.num_blocks


def test_structured_logs_without_prompt_text(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kogpt")
    secret = "아무도 모르는 비밀 문장"
    body = {"inputs": secret, "parameters": {"max_new_tokens": 3}}
    r = client.post("/generate", json=body, headers={"X-Request-ID": "log-test-1"})
    assert r.status_code == 200

    def records(name: str) -> list[dict]:
        found = [json.loads(x.getMessage()) for x in caplog.records if x.name == name]
        return [x for x in found if x["request_id"] == "log-test-1"]

    deadline = time.monotonic() + 5
    while not records("kogpt.access") and time.monotonic() < deadline:
        time.sleep(0.02)
    [generation] = records("kogpt.request")
    assert generation["endpoint"] == "/generate" and generation["generated_tokens"] == 3
    assert generation["prompt_tokens"] > 0 and generation["ttft_s"] is not None
    [access] = records("kogpt.access")
    assert access["status"] == 200 and access["path"] == "/generate"
    assert secret not in caplog.text and "prompt" not in generation


def test_request_id_header(client: httpx.Client) -> None:
    r = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(client.get("/health").headers["x-request-id"]) == 32


def _serve(model: str, grace: float) -> tuple[subprocess.Popen, str]:
    args = ["--model", model, "--num-kv-blocks", "128", "--shutdown-grace-seconds", str(grace)]
    return start_server([*args, "--log-level", "warning"], timeout=120)


def test_sigterm_drains_then_cuts_then_exits(live_server: LiveServer) -> None:
    """SIGTERM: /ready 503 and new requests 503 at once; a short in-flight request finishes;
    long ones are cut with a final 503 event when the grace period ends; the process exits."""
    proc, url = _serve(live_server.state.settings.model, grace=2.0)
    try:
        results: dict[str, list] = {}
        started = threading.Barrier(5)

        def consume(name: str, tokens: int) -> None:
            params = {"max_new_tokens": tokens, "ignore_eos": True}
            body = {"inputs": "대한민국은", "parameters": params}
            events = []
            with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
                for event in sse_events(r.iter_lines()):
                    if not events:
                        started.wait(30)
                    events.append(event)
            results[name] = events

        readers = [threading.Thread(target=consume, args=("short", 30))]
        readers += [threading.Thread(target=consume, args=(f"long{i}", 1000)) for i in range(3)]
        for reader in readers:
            reader.start()
        started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(f"{url}/ready").json() == {"status": "draining"}
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.post(f"{url}/generate", json={"inputs": "국민"})
        assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
        for reader in readers:
            reader.join(60)
        assert results["short"][-1]["details"]["generated_tokens"] == 30
        for i in range(3):
            last = results[f"long{i}"][-1]
            assert last.get("error_type") == "unavailable", last
            assert len(results[f"long{i}"]) < 1000
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
