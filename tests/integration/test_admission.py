"""Requests priced at admission (#21's attacks, sized for CI): each gets a 422 naming the
limit before it reaches the engine, and the server keeps serving everyone else meanwhile."""

from __future__ import annotations

import dataclasses
import gc
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import LiveServer, start_server, stop_server

CANARY = {"inputs": "대한민국은", "parameters": {"max_new_tokens": 4}}
# A refused request: 422 (TGI), or 400 on /v1 where OpenAI answers request errors with it.


def error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    return body["error"] if isinstance(body["error"], dict) else body


def probe_health(base_url: str, stop: threading.Event, latencies: list[float]) -> None:
    """GET /health every 10 ms until `stop`: its latencies."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)


def health_while(base_url: str, work: Any) -> list[float]:
    """/health's latencies while `work(latencies)` runs in this thread."""
    latencies: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=probe_health, args=(base_url, stop, latencies))
    thread.start()
    try:
        work(latencies)
    finally:
        stop.set()
        thread.join(timeout=30)
    return latencies


def test_a_huge_prompt_list_is_refused_before_parsing(
    client: httpx.Client, live_server: LiveServer
) -> None:
    """150,000 one-token prompts (900 KB, under the body limit): refused from the raw body by
    their count, in a worker thread, before anything parses, validates or encodes them (the
    event loop was held 38-49 s, then about a second per body in parsing and validation).
    /health answers as fast while such bodies arrive back to back as when idle: its median
    and 90th percentile stay under 100 ms (beside idle probes in the same run)."""
    body = {"model": live_server.state.model_name, "prompt": [[5]] * 150_000, "max_tokens": 1}
    content = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    probes = 40

    def idle_wait(latencies: list[float]) -> None:
        while len(latencies) < probes:
            time.sleep(0.01)

    replies: list[httpx.Response] = []

    def send_bodies(latencies: list[float]) -> None:
        while len(latencies) < probes or len(replies) < 3:  # back to back, one at a time
            replies.append(client.post("/v1/completions", content=content, headers=headers))

    idle = health_while(live_server.base_url, idle_wait)

    loaded = health_while(live_server.base_url, send_bodies)
    for r in replies:
        assert r.status_code == 400, r.text  # /v1: OpenAI's 400
        assert error(r)["param"] == "prompt" and "--max-request-sequences" in error(r)["message"]
    assert client.post("/generate", json=CANARY).status_code == 200
    assert len(idle) >= probes and len(loaded) >= probes, (idle, loaded)
    summary = {  # (median, 90th percentile, max) in seconds
        "idle": (statistics.median(idle), statistics.quantiles(idle, n=10)[-1], max(idle)),
        "loaded": (statistics.median(loaded), statistics.quantiles(loaded, n=10)[-1], max(loaded)),
    }
    # The median and the 90th percentile: a body parsed on the loop (about a second each,
    # back to back) slows most probes; one probe stalled by the OS on a busy machine is not
    # the loop's work.
    assert statistics.median(loaded) < 0.1, summary
    assert statistics.quantiles(loaded, n=10)[-1] < 0.1, summary


def test_the_largest_accepted_body_leaves_health_fast(live_server: LiveServer) -> None:
    """1,024 prompts (--max-request-sequences) of 220 token ids (878 KB, under the 1 MiB body
    limit): admitted and run. /health's slowest probe took 299 ms beside it (median 2-3 ms):
    FastAPI decoded and validated the body on the event loop, and full garbage collections
    traversed the model's millions of objects (100-300 ms each) on whichever thread
    allocated, often the loop's. Now the body is decoded and validated in a worker thread
    (OffLoopBodyRoute) and those objects are frozen out of the collector at start-up.
    Idle and loaded probes in the same run; the loaded median, 90th and 99th percentiles
    stay under 100 ms."""
    settings = live_server.state.settings
    count = settings.max_request_sequences
    prompts = [[5 + (i + j) % 900 for j in range(220)] for i in range(count)]
    body = {"model": live_server.state.model_name, "prompt": prompts, "max_tokens": 1}
    content = json.dumps(body, separators=(",", ":")).encode()
    assert 800_000 < len(content) <= settings.max_body_bytes  # the largest that is accepted
    assert gc.get_freeze_count() > 0  # the start-up objects are out of the collector
    headers = {"content-type": "application/json"}
    probes = 40

    def idle_wait(latencies: list[float]) -> None:
        while len(latencies) < probes * 3:
            time.sleep(0.01)

    replies: list[httpx.Response] = []

    def send_body(_: list[float]) -> None:
        url = f"{live_server.base_url}/v1/completions"
        replies.append(httpx.post(url, content=content, headers=headers, timeout=600))

    idle = health_while(live_server.base_url, idle_wait)
    loaded = health_while(live_server.base_url, send_body)
    (reply,) = replies
    assert reply.status_code == 200, reply.text[:300]
    assert len(reply.json()["choices"]) == count
    assert len(loaded) >= probes, loaded

    def summary_of(values: list[float]) -> tuple[float, ...]:  # median, p90, p99, max
        tenths, hundredths = statistics.quantiles(values, n=10), statistics.quantiles(values, n=100)
        return statistics.median(values), tenths[-1], hundredths[-1], max(values)

    summary = {"idle": summary_of(idle), "loaded": summary_of(loaded)}
    median, p90, p99, _ = summary["loaded"]
    assert median < 0.1 and p90 < 0.1 and p99 < 0.1, summary


def test_prompts_times_n_is_priced_as_a_whole(
    client: httpx.Client, live_server: LiveServer
) -> None:
    """1,000 prompts x n 256 is 256,000 sequences: one request, refused (max_num_seqs is per
    prompt); the same prompts with n 1 fit."""
    model = live_server.state.model_name
    body = {"model": model, "prompt": ["대한민국은"] * 1000, "n": 256, "max_tokens": 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text  # /v1: OpenAI's 400
    assert "256000 sequences" in error(r)["message"] and error(r)["param"] == "prompt"
    fits = {"model": model, "prompt": ["대한민국은"] * 8, "n": 2, "max_tokens": 1}
    assert client.post("/v1/completions", json=fits).status_code == 200


@pytest.mark.parametrize("field", ["suppress_tokens", "begin_suppress_tokens"])
def test_sampling_with_every_token_banned_is_a_422(
    client: httpx.Client, live_server: LiveServer, field: str
) -> None:
    """Was a 500 ("probability tensor contains either inf, nan or element < 0")."""
    vocab = int(live_server.state.loaded.config.vocab_size)
    parameters = {"max_new_tokens": 2, "do_sample": True, field: list(range(vocab))}
    r = client.post("/generate", json={"inputs": "국민", "parameters": parameters})
    assert r.status_code == 422, r.text
    assert error(r)["field"] == field and str(vocab) in error(r)["error"]
    greedy = {**parameters, "do_sample": False}  # generate's argmax of an all -inf row
    assert (
        client.post("/generate", json={"inputs": "국민", "parameters": greedy}).status_code == 200
    )


def words(count: int, alternatives: int, length: int) -> list[list[list[int]]]:
    """`count` one-of words of `alternatives` distinct `length`-token alternatives."""
    return [
        [[10 + w, 100 + a, *range(200, 200 + length - 2)] for a in range(alternatives)]
        for w in range(count)
    ]


@pytest.mark.parametrize(
    ("force_words_ids", "num_beams"),
    [(words(50, 50, 5), 4), (words(25, 40, 5), 2), ([[t] for t in range(20, 50)], 256)],
    ids=["50x50x5-4-beams", "25x40x5-2-beams", "30-tokens-256-beams"],
)
def test_constrained_beam_work_is_priced(
    client: httpx.Client, force_words_ids: list[Any], num_beams: int
) -> None:
    """Each held the engine for minutes (11 GB for the first); now a 422 naming the field."""
    parameters = {"max_new_tokens": 4, "num_beams": num_beams, "force_words_ids": force_words_ids}
    r = client.post("/generate", json={"inputs": "국민", "parameters": parameters})
    assert r.status_code == 422, r.text
    assert error(r)["field"] == "force_words_ids"
    assert "--max-constraint-work" in error(r)["error"]
    small = {"max_new_tokens": 4, "num_beams": 2, "force_words_ids": words(2, 2, 3)}
    assert client.post("/generate", json={"inputs": "국민", "parameters": small}).status_code == 200
    assert client.post("/generate", json=CANARY).status_code == 200


@pytest.mark.parametrize(
    ("parameters", "field", "flag"),
    [
        ({"dola_layers": [1] * 400}, "dola_layers", "--max-dola-work"),
        (
            {"penalty_alpha": 0.6, "top_k": 256, "max_new_tokens": 100},
            "top_k",
            "--max-contrastive-work",
        ),
    ],
    ids=["dola-400-layers", "contrastive-top-k-256"],
)
def test_method_work_per_step_is_priced(
    client: httpx.Client, parameters: dict[str, Any], field: str, flag: str
) -> None:
    """DoLa stacks a vocabulary row per listed layer (repeats included) every step;
    contrastive search copies the KV cache once per top_k candidate every step."""
    r = client.post("/generate", json={"inputs": "국민", "parameters": parameters})
    assert r.status_code == 422, r.text
    assert error(r)["field"] == field and flag in error(r)["error"]
    small = {"dola_layers": [1, 2], "max_new_tokens": 2}
    assert client.post("/generate", json={"inputs": "국민", "parameters": small}).status_code == 200


def test_info_reports_the_method_limits(client: httpx.Client) -> None:
    info = client.get("/info").json()
    assert info["max_constraint_work"] == 2048 and info["max_contrastive_work"] == 16384
    assert info["max_dola_work"] == 1_048_576 and info["max_request_sequences"] == 1024


@pytest.mark.parametrize(
    "method",
    [{"penalty_alpha": 0.6, "top_k": 4}, {"dola_layers": "high"}],
    ids=["contrastive", "dola"],
)
def test_max_time_ends_a_class_b_request_with_length(
    client: httpx.Client, method: dict[str, Any]
) -> None:
    """max_time is checked inside class-B steps too; the request ends as generate ends it."""
    parameters = {**method, "max_new_tokens": 400, "ignore_eos": True, "max_time": 0.05,
                  "details": True}  # fmt: skip
    r = client.post("/generate", json={"inputs": "대한민국은", "parameters": parameters})
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    assert details["finish_reason"] == "length" and 1 <= details["generated_tokens"] < 400


# -- HTTP: slow bodies and the connection cap ---------------------------------------------
@pytest.fixture(scope="module")
def strict_server(live_server: LiveServer) -> Iterator[LiveServer]:
    """The live server's engine behind an app with 1 s header and body deadlines."""
    update = {"body_read_timeout_seconds": 1.0, "header_read_timeout_seconds": 1.0}
    live = start_server(live_server.state.settings.model_copy(update=update), live_server.state)
    yield live
    stop_server(live)


def slow_body(base_url: str, declared: int = 100_000) -> socket.socket:
    """A client that declares a body and sends its first bytes only."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"inputs": "')
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):  # b"" once the server closed the connection
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_slow_body_gets_408_and_its_socket_closed(strict_server: LiveServer) -> None:
    """Was: held open for ever (1,100 such sockets, one byte every 5 s)."""
    sock = slow_body(strict_server.base_url)
    try:
        reply = read_all(sock)  # returns only when the server closes the connection
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"--body-read-timeout-seconds" in reply
    r = httpx.post(f"{strict_server.base_url}/generate", json=CANARY, timeout=60)
    assert r.status_code == 200


def connect(base_url: str) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_slow_headers_get_408_and_their_socket_closed(strict_server: LiveServer) -> None:
    """A client that sends half a request line and then nothing held its socket for ever
    (uvicorn has no header deadline)."""
    sock = connect(strict_server.base_url)
    try:
        sock.sendall(b"POST /gener")
        reply = read_all(sock)  # returns only when the server closes the connection
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"--header-read-timeout-seconds" in reply


def test_a_silent_connection_is_closed(strict_server: LiveServer) -> None:
    sock = connect(strict_server.base_url)
    try:
        assert read_all(sock) == b""  # closed, nothing written: no request was started
    finally:
        sock.close()


def test_a_kept_alive_connections_next_request_has_the_header_deadline(
    strict_server: LiveServer,
) -> None:
    """A whole request is answered; the same connection's next request, started and left
    unfinished, is closed with a 408 (the keep-alive timer stops at its first byte)."""
    sock = connect(strict_server.base_url)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"}" not in first:  # the JSON body ends the response
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        reply = read_all(sock)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_past_the_connection_cap_a_503_at_once(live_server: LiveServer) -> None:
    update = {"body_read_timeout_seconds": 60.0, "max_connections": 4}
    capped = start_server(live_server.state.settings.model_copy(update=update), live_server.state)
    server_state = capped.server.server_state
    try:
        held = []
        for i in range(3):  # three requests being served (reading their bodies)...
            held.append(slow_body(capped.base_url))
            deadline = time.monotonic() + 10
            while len(server_state.tasks) < i + 1:
                assert time.monotonic() < deadline, "the slow request was not served"
                time.sleep(0.02)
        try:  # ...so a fourth connection is past the cap of 4 (uvicorn counts it too)
            assert httpx.get(f"{capped.base_url}/health").status_code == 503
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{capped.base_url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the cap did not free up"
            time.sleep(0.1)
    finally:
        stop_server(capped)


def test_a_server_wide_default_max_time(live_server: LiveServer) -> None:
    """--default-max-time-seconds ends requests that set no max_time (finish reason length,
    as generate's MaxTimeCriteria does); a request's own max_time wins."""
    settings = live_server.state.settings.model_copy(update={"default_max_time_seconds": 0.05})
    timed = start_server(settings, dataclasses.replace(live_server.state, settings=settings))
    try:
        long = {"max_new_tokens": 400, "ignore_eos": True, "details": True}
        body = {"inputs": "대한민국은", "parameters": long}
        r = httpx.post(f"{timed.base_url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        details = r.json()["details"]
        assert details["finish_reason"] == "length" and details["generated_tokens"] < 400
        own = {**long, "max_new_tokens": 40, "max_time": 60}
        r = httpx.post(f"{timed.base_url}/generate", json={**body, "parameters": own}, timeout=120)
        assert r.json()["details"]["generated_tokens"] == 40
    finally:
        stop_server(timed)
