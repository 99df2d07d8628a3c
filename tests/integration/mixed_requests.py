"""A mix of real API requests and the checks that each answer is complete and consistent.

Shared by the load and fault tests and the soak script (tests/soak/soak.py). `build_cases`
draws requests over every generation route (TGI, OpenAI, few-shot; streaming and not) and
many options (greedy, seeded sampling, top-k / top-p, repetition penalty, beams, n > 1,
stop strings). `run_case` sends one and checks its answer: status 200, a stream that ends
with its final event, valid finish reasons, token counts equal to what the details report.
A violated check is returned as `Outcome.error` (never raised), so a load run reports all.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = (
    "대한민국은",
    "모든 국민은 법 앞에 평등하다.",
    "국회는 국민의 보통·평등·직접·비밀선거에 의하여 선출된 국회의원으로 구성한다.",
    "대통령은 국가의 원수이며, 외국에 대하여 국가를 대표한다.",
    "헌법",
    "모든 국민은 인간으로서의 존엄과 가치를 가지며, 행복을 추구할 권리를 가진다. 국가는",
    "법원은",
    "제1조",
)
FEW_SHOT_TASK = "다음 문장의 감정을 긍정 또는 부정으로 분류하세요."
FEW_SHOT_EXAMPLES = [
    {"input": "이 영화 정말 재미있었어요.", "output": "긍정"},
    {"input": "서비스가 너무 불친절했다.", "output": "부정"},
]
TGI_REASONS = {"length", "eos_token", "stop_sequence"}
OPENAI_REASONS = {"length", "stop"}

# TGI parameter sets: (name, options, deterministic, streamable). Seeds are filled in per case.
TGI_OPTIONS: tuple[tuple[str, dict[str, Any], bool, bool], ...] = (
    ("greedy", {}, True, True),
    ("seeded", {"do_sample": True, "temperature": 0.9}, True, True),
    ("top-k-top-p", {"do_sample": True, "top_k": 20, "top_p": 0.9}, True, True),
    ("repetition-penalty", {"repetition_penalty": 1.3}, True, True),
    ("sampled-penalty", {"do_sample": True, "repetition_penalty": 1.2, "top_k": 40}, True, True),
    ("beams", {"num_beams": 2}, True, False),
    ("best-of-2", {"do_sample": True, "best_of": 2}, True, False),
    ("stop-string", {"stop": ["."], "do_sample": True}, True, True),
    ("unseeded", {"do_sample": True, "top_p": 0.95}, False, True),
)


@dataclass(frozen=True)
class Case:
    """One request: route, body, and whether its output is reproducible on its own."""

    name: str
    path: str
    body: dict[str, Any]
    stream: bool
    deterministic: bool
    max_new_tokens: int

    @property
    def kind(self) -> str:
        return f"{self.path}{' stream' if self.stream else ''} {self.name}"


@dataclass
class Outcome:
    case: Case
    status: int = 0
    texts: list[str] = field(default_factory=list)  # per returned sequence, in order
    error: str | None = None
    latency_s: float = 0.0
    body: Any = None  # the parsed answer (JSON, or the list of stream events)


def _with_seed(options: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**options, "seed": seed} if options.get("do_sample") else dict(options)


def build_case(rng: random.Random, max_new_tokens: int) -> Case:
    """One request drawn from the mix (routes and options roughly evenly)."""
    route = rng.choice(("generate", "generate_stream", "openai", "openai_stream", "few-shot"))
    prompt = rng.choice(PROMPTS)
    seed = rng.randrange(1, 10_000)
    stream = route.endswith("stream") or (route == "few-shot" and rng.random() < 0.5)
    if route.startswith("openai"):
        return _openai_case(rng, prompt, seed, stream, max_new_tokens)
    choices = [o for o in TGI_OPTIONS if o[3] or not stream]
    name, options, deterministic, _ = rng.choice(choices)
    params = {**_with_seed(options, seed), "max_new_tokens": max_new_tokens, "details": True}
    if route == "few-shot":
        body = {"task": FEW_SHOT_TASK, "examples": FEW_SHOT_EXAMPLES, "query": prompt}
        return Case(
            name, "/few-shot", {**body, "parameters": params, "stream": stream}, stream,
            deterministic, max_new_tokens,
        )  # fmt: skip
    path = "/generate_stream" if stream else "/generate"
    body = {"inputs": prompt, "parameters": params}
    return Case(name, path, body, stream, deterministic, max_new_tokens)


def _openai_case(
    rng: random.Random, prompt: str, seed: int, stream: bool, max_new_tokens: int
) -> Case:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_new_tokens, "stream": stream}
    if stream:  # usage comes as a last chunk of its own only when asked for (as OpenAI)
        body["stream_options"] = {"include_usage": True}
    variant = rng.choice(("greedy", "seeded", "n-2", "top-k", "penalty", "beams", "unseeded"))
    if stream and variant == "beams":
        variant = "greedy"
    if variant in ("greedy", "penalty", "beams"):
        body["temperature"] = 0
    else:
        body["temperature"] = 0.8
        if variant != "unseeded":
            body["seed"] = seed
    extra = {"n-2": {"n": 2}, "top-k": {"top_k": 30, "top_p": 0.9}, "beams": {"num_beams": 2}}
    extra["penalty"] = {"repetition_penalty": 1.25}
    body.update(extra.get(variant, {}))
    if rng.random() < 0.5:
        body["logprobs"] = 1
    return Case(variant, "/v1/completions", body, stream, variant != "unseeded", max_new_tokens)


def build_cases(count: int, max_new_tokens: int, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    return [build_case(rng, max_new_tokens) for _ in range(count)]


# -- sending and checking ----------------------------------------------------------------
def stream_payloads(lines: list[str]) -> list[Any]:
    """The `data:` payloads of an SSE body (JSON, or the string "[DONE]")."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def send(client: httpx.AsyncClient, case: Case) -> tuple[int, Any]:
    """(status, parsed answer): JSON, or a stream's payloads."""
    if not case.stream:
        r = await client.post(case.path, json=case.body)
        return r.status_code, r.json()
    async with client.stream("POST", case.path, json=case.body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.json()
        return 200, stream_payloads([line async for line in r.aiter_lines()])


async def run_case(client: httpx.AsyncClient, case: Case) -> Outcome:
    outcome = Outcome(case)
    started = time.perf_counter()
    try:
        outcome.status, outcome.body = await send(client, case)
        outcome.latency_s = time.perf_counter() - started
        if outcome.status != 200:
            raise AssertionError(f"HTTP {outcome.status}: {outcome.body}")
        outcome.texts = check(case, outcome.body)
    except (AssertionError, httpx.HTTPError, ValueError, KeyError, TypeError) as err:
        outcome.latency_s = time.perf_counter() - started
        outcome.error = f"{type(err).__name__}: {err}"
    return outcome


def check(case: Case, answer: Any) -> list[str]:
    """Check a 200 answer is complete and consistent; return its texts."""
    if case.path == "/v1/completions":
        return check_openai_stream(case, answer) if case.stream else check_openai(case, answer)
    if case.stream:
        return [check_tgi_stream(case, answer)]
    if case.path == "/few-shot":
        return check_few_shot(case, answer)
    return check_tgi(case, answer)


def _check_tgi_details(case: Case, text: str, details: dict[str, Any]) -> None:
    reason, count = details["finish_reason"], details["generated_tokens"]
    assert reason in TGI_REASONS, f"finish_reason {reason!r}"
    assert count == len(details["tokens"]), (count, len(details["tokens"]))
    assert "".join(t["text"] for t in details["tokens"]) == text, "token texts != text"
    assert 1 <= count <= case.max_new_tokens, count
    assert reason != "length" or count == case.max_new_tokens, (reason, count)


def check_tgi(case: Case, answer: dict[str, Any]) -> list[str]:
    text, details = answer["generated_text"], answer["details"]
    _check_tgi_details(case, text, details)
    others = details.get("best_of_sequences") or []
    best_of = case.body["parameters"].get("best_of") or 1
    assert len(others) == best_of - 1, f"{len(others)} best_of_sequences for best_of {best_of}"
    for other in others:
        _check_tgi_details(case, other["generated_text"], other)
    return [text] + [o["generated_text"] for o in others]


def check_few_shot(case: Case, answer: dict[str, Any]) -> list[str]:
    details = answer["details"]
    assert answer["finish_reason"] == details["finish_reason"] in TGI_REASONS
    assert answer["generated_tokens"] == details["generated_tokens"] == len(details["tokens"])
    assert answer["answer"] == "".join(t["text"] for t in details["tokens"]).strip()
    assert answer["prompt_tokens"] > 0 and answer["num_examples"] == len(FEW_SHOT_EXAMPLES)
    return [answer["answer"]]


def check_tgi_stream(case: Case, events: list[Any]) -> str:
    assert events, "empty stream"
    errors = [e for e in events if not isinstance(e, dict) or "error" in e]
    assert not errors, f"error events: {errors[:2]}"
    assert [e["index"] for e in events] == list(range(1, len(events) + 1)), "token indexes"
    *tokens, final = events
    assert all(e["generated_text"] is None and e["details"] is None for e in tokens)
    assert final["generated_text"] is not None and final["details"], "no final event"
    details = final["details"]
    assert details["generated_tokens"] == len(events), (details, len(events))
    reason = details["finish_reason"]
    assert reason in TGI_REASONS and (reason != "length" or len(events) == case.max_new_tokens)
    text = "".join(e["token"]["text"] for e in events)
    if case.path == "/few-shot":
        assert final["generated_text"] == text.strip() and final["prompt_tokens"] > 0
    else:
        assert final["generated_text"] == text, "token texts != generated_text"
    return str(final["generated_text"])


def _choice_tokens(choice: dict[str, Any]) -> int | None:
    logprobs = choice.get("logprobs")
    return None if logprobs is None else len(logprobs["tokens"])


def check_openai(case: Case, answer: dict[str, Any]) -> list[str]:
    n = case.body.get("n", 1)
    choices = answer["choices"]
    assert [c["index"] for c in choices] == list(range(n)), "choice indexes"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    counts = [_choice_tokens(c) for c in choices]
    for choice, count in zip(choices, counts, strict=True):
        assert choice["finish_reason"] in OPENAI_REASONS, choice["finish_reason"]
        if count is not None and choice["finish_reason"] == "length":
            assert count == case.max_new_tokens, (count, case.max_new_tokens)
    if all(c is not None for c in counts):
        assert usage["completion_tokens"] == sum(c for c in counts if c is not None), usage
    return [c["text"] for c in choices]


def check_openai_stream(case: Case, events: list[Any]) -> list[str]:
    assert events and events[-1] == "[DONE]", "stream does not end with [DONE]"
    chunks = events[:-1]
    assert all(isinstance(c, dict) and "error" not in c for c in chunks), "error event"
    n = case.body.get("n", 1)
    texts, counts, reasons = [""] * n, [0] * n, [None] * n
    for chunk in chunks:
        for choice in chunk["choices"]:
            i = choice["index"]
            assert reasons[i] is None, f"choice {i} continues after its finish_reason"
            texts[i] += choice["text"]
            tokens = _choice_tokens(choice)
            counts[i] += 1 if tokens is None else tokens
            reasons[i] = choice["finish_reason"]
    assert all(r in OPENAI_REASONS for r in reasons), f"finish reasons {reasons}"
    for reason, count in zip(reasons, counts, strict=True):
        assert 1 <= count <= case.max_new_tokens and (
            reason != "length" or count == case.max_new_tokens
        ), (reason, count)
    usage = chunks[-1]["usage"]
    assert usage is not None and chunks[-1]["choices"] == [], "no usage chunk at the end"
    assert all(c.get("usage") is None for c in chunks[:-1]), "usage before the last chunk"
    assert usage["completion_tokens"] == sum(counts), (usage, counts)
    return texts


async def run_all(base_url: str, cases: list[Case], concurrency: int) -> list[Outcome]:
    """Send every case with at most `concurrency` in flight; outcomes in case order."""
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:

        async def one(case: Case) -> Outcome:
            async with semaphore:
                return await run_case(client, case)

        return list(await asyncio.gather(*(one(c) for c in cases)))


def run_load(base_url: str, cases: list[Case], concurrency: int) -> list[Outcome]:
    return asyncio.run(run_all(base_url, cases, concurrency))
