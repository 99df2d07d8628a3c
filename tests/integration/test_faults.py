"""Faults under load: clients leaving mid-stream, a request failing inside the engine, a KV
pool too small for the batch (preemptions), and a full waiting queue (429, then recovery).

SIGTERM during load is in test_shutdown_load.py. Every test ends with the KV pool entirely
free and the block pool's integrity check passing.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.integration.conftest import (
    LiveServer,
    metric,
    side_state,
    start_server,
    stop_server,
)
from tests.integration.mixed_requests import (
    Case,
    Outcome,
    build_cases,
    run_all,
    run_case,
    run_load,
    stream_payloads,
)
from tests.integration.test_load import assert_pool_free, assert_same_alone, failures

POISON = "고장 난 요청입니다"  # the prompt of the request that fails inside the engine
FAULT_AFTER = 3  # output tokens the poisoned request produces before its fault
GROUPS = {"beams", "best-of-2", "n-2"}  # cases with more than one sequence


def private_server(live: LiveServer, num_blocks: int, max_waiting: int = 1024) -> LiveServer:
    state = side_state(live.state, max_num_seqs=64, max_waiting=max_waiting, num_blocks=num_blocks)
    return start_server(live.state.settings, state)


def close_server(live: LiveServer) -> None:
    stop_server(live)
    live.state.engine.stop()


@pytest.fixture(scope="module")
def fault_server(live_server: LiveServer) -> Iterator[LiveServer]:
    """Its own engine, so patching it for a fault touches no other test's server."""
    live = private_server(live_server, num_blocks=256)
    yield live
    close_server(live)


def witnesses(count: int, seed: int, max_new_tokens: int = 12) -> list[Case]:
    """Reproducible requests that run beside a fault and must come out as if alone."""
    drawn = build_cases(count * 2, max_new_tokens, seed=seed)
    return [c for c in drawn if c.deterministic][:count]


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the server to reach a state (bounded by the test's HTTP timeouts)."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never reached the expected state")


# -- clients that leave -----------------------------------------------------------------
def leaving_case(i: int) -> tuple[str, dict[str, Any]]:
    """A stream that cannot finish on its own before its client leaves."""
    prompt = f"제{i}조 모든 국민은"
    long = {"max_new_tokens": 400, "ignore_eos": True}
    kind = i % 4
    if kind == 0:
        return "/generate_stream", {"inputs": prompt, "parameters": long}
    if kind == 1:
        body = {"prompt": prompt, "max_tokens": 400, "ignore_eos": True, "stream": True}
        return "/v1/completions", {**body, "n": 1 + i % 3, "temperature": 0.8, "seed": i}
    if kind == 2:
        params = {**long, "do_sample": True, "top_k": 20, "seed": i}
        return "/generate_stream", {"inputs": prompt, "parameters": params}
    template = {"stop_at_separator": False}
    body = {"query": prompt, "examples": [{"input": "a", "output": "b"}], "template": template}
    return "/few-shot", {**body, "parameters": long, "stream": True}


async def open_and_leave(client: httpx.AsyncClient, i: int) -> int:
    """Open the stream, read a few events, close the connection; the events read."""
    path, body = leaving_case(i)
    seen = 0
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            seen += line.startswith("data:")
            if seen >= 2 + i % 3:
                break
    return seen


async def leave_beside(base_url: str, stay: list[Case], leaving: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=leaving, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        staying = asyncio.ensure_future(run_all(base_url, stay, len(stay)))
        seen = await asyncio.gather(*(open_and_leave(client, i) for i in range(leaving)))
    assert all(n >= 2 for n in seen)
    return await staying


def aborts(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return metric(text, "kogpt_request_finish_total", finish_reason="abort")


def test_hundred_clients_leaving_mid_stream(live_server: LiveServer) -> None:
    url = live_server.base_url
    stay = witnesses(12, seed=21)
    before = aborts(url)
    outcomes = asyncio.run(leave_beside(url, stay, leaving=100))
    assert not failures(outcomes), failures(outcomes)
    assert_pool_free(live_server)
    assert aborts(url) - before == 100  # every leaving client aborted its engine request
    assert_same_alone(url, outcomes)
    assert_pool_free(live_server)


# -- a request that fails inside the engine ---------------------------------------------
class FaultyDetokenizer:
    """Wraps a sequence's incremental detokenizer; raises on its FAULT_AFTER-th token."""

    def __init__(self, inner: Any, fire: Callable[[str], None]) -> None:
        self.inner, self.fire, self.calls = inner, fire, 0

    def add(self, token: int) -> str:
        self.calls += 1
        if self.calls >= FAULT_AFTER:
            self.fire("detokenizer")
        return str(self.inner.add(token))

    def flush(self) -> str:
        return str(self.inner.flush())


class Injector:
    """Makes one per-request stage of the engine raise for the poisoned prompt only, and
    records how many other requests were running when it did."""

    def __init__(self, live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.engine = live.state.engine.engine
        self.poison = list(live.state.tokenizer(POISON, add_special_tokens=False)["input_ids"])
        self.monkeypatch = monkeypatch
        self.others_running: list[int] = []

    def is_poison(self, token_ids: Any) -> bool:
        return list(token_ids[: len(self.poison)]) == self.poison

    def fire(self, stage: str) -> None:
        running = self.engine.scheduler.running
        self.others_running.append(sum(not self.is_poison(r.seqs[0].token_ids) for r in running))
        raise RuntimeError(f"injected fault in the {stage}")

    def due(self, token_ids: Any) -> bool:
        return self.is_poison(token_ids) and len(token_ids) - len(self.poison) >= FAULT_AFTER

    def install(self, stage: str) -> None:
        engine = self.engine
        if stage == "forward":  # the batched forward fails; the engine must retry per request
            # the runner's step entry point (execute_step where the runner has one)
            name = "execute_step" if hasattr(engine.runner, "execute_step") else "execute"
            execute = getattr(engine.runner, name)

            def faulty_execute(sched: Any, **kwargs: Any) -> Any:
                for item in sched.seqs:
                    request = engine.scheduler.requests.get(item.request_id)
                    seqs = request.seqs if request is not None else []
                    if any(s.seq_id == item.seq_id and self.due(s.token_ids) for s in seqs):
                        self.fire(stage)
                return execute(sched, **kwargs)

            self.monkeypatch.setattr(engine.runner, name, faulty_execute)
            return
        if stage == "sampler":  # the batched call fails; the engine must retry per request
            sample = engine.sampler.sample

            def faulty_sample(logits: Any, rows: Any) -> Any:
                if any(self.due(r.token_ids) for r in rows):
                    self.fire(stage)
                return sample(logits, rows)

            self.monkeypatch.setattr(engine.sampler, "sample", faulty_sample)
            return
        if stage == "detokenizer":
            init = engine._init_sequence

            def faulty_init(state: Any, seq: Any) -> None:
                init(state, seq)
                if self.is_poison(seq.token_ids):
                    text = state.sequences[seq.seq_id].text
                    text.detok = FaultyDetokenizer(text.detok, self.fire)

            self.monkeypatch.setattr(engine, "_init_sequence", faulty_init)
            return
        add = engine.add_request

        def faulty_add(request_id: str, prompt: list[int], params: Any, **lane: Any) -> None:
            add(request_id, prompt, params, **lane)
            if not self.is_poison(prompt):
                return
            state = engine._states[request_id]
            if stage == "stop check":
                check = state.output.check
                state.output.check = lambda ids: self.fire(stage) if self.due(ids) else check(ids)
            else:  # beam step
                step, calls = state.beam.step, []

                def faulty_step(logits: Any) -> Any:
                    calls.append(1)
                    if len(calls) >= FAULT_AFTER:
                        self.fire(stage)
                    return step(logits)

                state.beam.step = faulty_step

        self.monkeypatch.setattr(engine, "add_request", faulty_add)


def poison_cases(stage: str) -> list[Case]:
    """The poisoned prompt, non-streaming on TGI and (beams aside) streaming on OpenAI."""
    beams = stage == "beam step"
    # Long enough to reach the fault: ignore_eos (min_new_tokens for beams, which refuse it).
    long: dict[str, Any] = {"min_new_tokens": 8} if beams else {"ignore_eos": True}
    tgi_options = {"num_beams": 2} if beams else {"do_sample": True, "seed": 5}
    params = {"max_new_tokens": 16, **long, **tgi_options}
    openai_options = {"num_beams": 2, "temperature": 0} if beams else {"seed": 5}
    body = {"prompt": POISON, "max_tokens": 16, **long, "stream": not beams}
    return [
        Case(stage, "/generate", {"inputs": POISON, "parameters": params}, False, True, 16),
        Case(stage, "/v1/completions", {**body, **openai_options}, not beams, True, 16),
    ]


async def poison_beside(live: LiveServer, stay: list[Case], poisoned: list[Case]) -> Any:
    engine = live.state.engine.engine
    async with httpx.AsyncClient(base_url=live.base_url, timeout=120) as client:
        staying = asyncio.ensure_future(run_all(live.base_url, stay, len(stay)))
        await until(lambda: engine.scheduler.num_running > 0)  # the others are in the batch
        failed = await asyncio.gather(*(run_case(client, c) for c in poisoned))
        return failed, await staying


def assert_clear_error(outcome: Outcome, stage: str) -> None:
    """A 500 (or, once streaming, a final error event) naming the fault, no stack trace."""
    message = f"generation failed: RuntimeError: injected fault in the {stage}"
    if not outcome.case.stream:
        assert outcome.status == 500, (outcome.status, outcome.body)
        body = outcome.body
        error = body["error"] if outcome.case.path == "/generate" else body["error"]["message"]
        assert error == message
    else:
        assert outcome.status == 200
        *tokens, last = outcome.body
        assert len(tokens) >= FAULT_AFTER - 1  # the stream had started
        expected = {"message": message, "type": "generation", "param": None, "code": 500}
        assert last["error"] == expected
    assert "Traceback" not in str(outcome.body) and 'File "' not in str(outcome.body)


@pytest.mark.parametrize("stage", ["forward", "sampler", "detokenizer", "stop check", "beam step"])
def test_request_failing_in_the_engine_fails_alone(
    fault_server: LiveServer, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    url = fault_server.base_url
    injector = Injector(fault_server, monkeypatch)
    injector.install(stage)
    stay = witnesses(8, seed=31, max_new_tokens=20)
    failed, outcomes = asyncio.run(poison_beside(fault_server, stay, poison_cases(stage)))
    for outcome in failed:
        assert_clear_error(outcome, stage)
    assert injector.others_running and max(injector.others_running) > 0  # in a shared batch
    assert not failures(outcomes), failures(outcomes)
    assert_pool_free(fault_server)
    monkeypatch.undo()
    assert_same_alone(url, outcomes)
    assert_pool_free(fault_server)


# -- a KV pool too small for the batch ---------------------------------------------------
def test_preemptions_change_no_output(live_server: LiveServer) -> None:
    """The same reproducible requests, concurrently, on the roomy live server and on a server
    whose pool holds only a couple of them: many preemptions, identical outputs."""
    cases = witnesses(24, seed=41)
    # Both servers in float64: in float32 a different batch composition may round a near-tie
    # the other way (matmul kernels depend on the batch size); float64 makes equality exact.
    loaded = live_server.state.loaded
    f64 = dataclasses.replace(
        loaded, model=copy.deepcopy(loaded.model).double(), dtype=torch.float64
    )
    base_state = dataclasses.replace(live_server.state, loaded=f64)
    roomy_server = start_server(
        live_server.state.settings,
        side_state(base_state, max_num_seqs=64, max_waiting=1024, num_blocks=256),
    )
    tight = start_server(
        live_server.state.settings,
        side_state(base_state, max_num_seqs=64, max_waiting=1024, num_blocks=20),
    )
    try:
        roomy = run_load(roomy_server.base_url, cases, len(cases))
        squeezed = run_load(tight.base_url, cases, len(cases))
        assert not failures(roomy + squeezed), failures(roomy + squeezed)
        preemptions = metric(httpx.get(f"{tight.base_url}/metrics").text, "kogpt_preemptions_total")
        assert preemptions > 0
        for a, b in zip(roomy, squeezed, strict=True):
            assert a.texts == b.texts, (a.case.kind, a.case.body)
        assert_pool_free(tight)
        assert_pool_free(roomy_server)
    finally:
        close_server(tight)
        close_server(roomy_server)


# -- a full waiting queue ----------------------------------------------------------------
def test_queue_full_429_on_every_route_then_recovers(side_server: LiveServer) -> None:
    """side_server runs 1 sequence and queues 1 request: with both taken every generation
    route answers 429 with Retry-After; once they are gone, the same requests succeed."""
    url = side_server.base_url
    engine = side_server.state.engine
    one_sequence = [c for c in witnesses(40, seed=51) if c.name not in GROUPS]
    routes = {(c.path, c.stream): c for c in one_sequence}
    assert len(routes) == 6  # every route, streaming and not

    async def hold_two_then_probe() -> list[tuple[int, Any, str | None]]:
        hold = {"inputs": "헌법", "parameters": {"max_new_tokens": 600, "ignore_eos": True}}
        async with (
            httpx.AsyncClient(base_url=url, timeout=60) as client,
            client.stream("POST", "/generate_stream", json=hold) as running,
        ):
            lines = running.aiter_lines()
            while not (await anext(lines)).startswith("data:"):
                pass
            async with client.stream("POST", "/generate_stream", json=hold):
                await until(lambda: engine.num_waiting >= 1)
                answers = []
                for case in routes.values():
                    r = await client.post(case.path, json=case.body)
                    answers.append((r.status_code, r.json(), r.headers.get("retry-after")))
                return answers

    answers = asyncio.run(hold_two_then_probe())
    for (path, stream), (status, body, retry_after) in zip(routes, answers, strict=True):
        assert status == 429, (path, stream, body)
        assert retry_after is not None and int(retry_after) >= 1
        assert "waiting" in str(body)
    assert_pool_free(side_server)
    recovered = run_load(url, list(routes.values()), 1)
    assert not failures(recovered), failures(recovered)
    assert all(o.status == 200 for o in recovered)
    assert_pool_free(side_server)


def test_stream_payloads_parse_sse_lines() -> None:
    lines = ['data: {"a":1}', "", ": ping", "data: [DONE]"]
    assert stream_payloads(lines) == [{"a": 1}, "[DONE]"]
