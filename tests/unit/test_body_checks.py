"""app/api/body_checks.py: a lone UTF-16 surrogate anywhere in a JSON body is found and named
by its dotted path; valid text (surrogate pairs included) never is. The raw scan of a body's
`prompt` list counts what json.loads would find."""

from __future__ import annotations

import json
import threading
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, field_validator

from app.api.body_checks import (
    LARGE_BODY_BYTES,
    OffLoopBodyRoute,
    lone_surrogate_field,
    prompt_list_length,
)

KEYS = st.text(alphabet="abcxyz_", min_size=1, max_size=5)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
LONE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "a\ud83d", "\ude00b"])


def plant(doc: Any, path: list[str | int], text: str) -> tuple[Any, str]:
    """`doc` with `text` at a new leaf below the first container on a path; the leaf's path."""
    if isinstance(doc, dict):
        key = "zz"
        return {**doc, key: text}, ".".join([*map(str, path), key])
    if isinstance(doc, list):
        return [*doc, text], ".".join([*map(str, path), str(len(doc))])
    return {"zz": text}, ".".join([*map(str, path), "zz"])


@settings(max_examples=60)
@given(doc=JSON)
def test_valid_text_is_never_flagged(doc: Any) -> None:
    with_pairs = {"emoji": "😀 \U0001f600", "korean": "대한민국", "doc": doc}
    for ensure_ascii in (True, False):
        body = json.dumps(with_pairs, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
        assert lone_surrogate_field(body) is None


@settings(max_examples=60)
@given(doc=JSON, lone=LONE, wrap=st.lists(KEYS, max_size=3))
def test_a_lone_surrogate_is_named_by_its_path(doc: Any, lone: str, wrap: list[str]) -> None:
    planted, leaf = plant(doc, wrap, lone)
    for key in reversed(wrap):
        planted = {key: planted}
    body = json.dumps(planted).encode()  # ensure_ascii: the surrogate travels as \\udXXX
    assert lone_surrogate_field(body) == leaf


def test_an_escaped_backslash_is_not_an_escape() -> None:
    assert lone_surrogate_field(json.dumps({"inputs": "\\ud800"}).encode()) is None
    assert lone_surrogate_field(b'{"inputs": "\\ud800"}') == "inputs"
    assert lone_surrogate_field(b'"\\udc00"') == "body"
    assert lone_surrogate_field(b'{"\\ud800": 1}') == "body"
    assert lone_surrogate_field(b'{"inputs": "\\ud800') is None  # not JSON: the parser's 422


PROMPTS = st.one_of(
    st.text(max_size=4),
    st.lists(st.integers(0, 9), max_size=3),
    st.lists(st.text(alphabet='ab"\\[],{}:가', max_size=4), min_size=1, max_size=3),
    st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=3), min_size=1, max_size=4),
    st.lists(st.one_of(st.text(max_size=3), st.lists(st.integers(), max_size=2), JSON), max_size=4),
)


def expected_count(doc: Any) -> int | None:
    prompt = doc.get("prompt") if isinstance(doc, dict) else None
    if not isinstance(prompt, list) or not prompt:
        return None
    if isinstance(prompt[0], (int, float)) and not isinstance(prompt[0], bool):
        return None  # a number first: one prompt of token ids
    return len(prompt)


@settings(max_examples=150)
@given(before=st.dictionaries(KEYS, JSON, max_size=3), prompt=PROMPTS, after=JSON)
def test_the_prompt_scan_counts_what_the_parser_finds(
    before: dict[str, Any], prompt: Any, after: Any
) -> None:
    doc = {**before, "prompt": prompt, "zz": after}
    for ensure_ascii in (True, False):
        body = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
        assert prompt_list_length(body, 1000) == expected_count(doc), body


def test_the_prompt_scan_stops_past_the_limit() -> None:
    body = json.dumps({"prompt": [[5]] * 150_000}).encode()
    assert prompt_list_length(body, 1024) == 1025
    assert prompt_list_length(json.dumps({"a": {"prompt": [[1], [2]]}}).encode(), 9) is None


VALIDATED_ON: list[str] = []  # the thread each validation of Prompts ran on


class Prompts(BaseModel):
    model_config = ConfigDict(strict=True)
    prompt: list[list[int]]

    @field_validator("prompt")
    @classmethod
    def record_thread(cls, value: list[list[int]]) -> list[list[int]]:
        VALIDATED_ON.append(threading.current_thread().name)
        return value


def off_loop_app() -> tuple[TestClient, list[str]]:
    """An app with one OffLoopBodyRoute; the endpoint records the event loop's thread."""
    router = APIRouter(route_class=OffLoopBodyRoute)
    loop_threads: list[str] = []

    @router.post("/count")
    async def count(body: Prompts) -> dict[str, int]:
        loop_threads.append(threading.current_thread().name)
        return {"prompts": len(body.prompt), "ids": sum(map(len, body.prompt))}

    app = FastAPI()
    app.include_router(router)
    return TestClient(app), loop_threads


def test_a_large_body_is_decoded_and_validated_off_the_event_loop() -> None:
    """Past LARGE_BODY_BYTES the body model is validated once, in a worker thread (FastAPI's
    own validation then passes the instance through); a small body as FastAPI always did."""
    client, loop_threads = off_loop_app()
    large = {"prompt": [[5 + j % 900 for j in range(200)] for _ in range(200)]}
    assert len(json.dumps(large)) > LARGE_BODY_BYTES
    VALIDATED_ON.clear()
    r = client.post("/count", json=large)
    assert r.status_code == 200 and r.json() == {"prompts": 200, "ids": 40_000}
    assert len(VALIDATED_ON) == 1 and VALIDATED_ON[0] != loop_threads[-1]
    VALIDATED_ON.clear()
    assert client.post("/count", json={"prompt": [[1, 2]]}).json() == {"prompts": 1, "ids": 2}
    assert [loop_threads[-1]] == VALIDATED_ON  # small: on the loop


def test_a_large_invalid_body_gets_fastapis_own_errors() -> None:
    client, _ = off_loop_app()
    wrong = {"prompt": [[5] * 200 for _ in range(200)] + [["x"]]}
    r = client.post("/count", json=wrong)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "prompt", 200, 0]
    not_json = b'{"prompt": [[' + b"5," * LARGE_BODY_BYTES + b"]"  # cut off
    r = client.post("/count", content=not_json, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
