"""POST /few-shot: prompt rendering, zero/one/few-shot, stop at the separator, prefix cache."""

from __future__ import annotations

import httpx
from transformers import AutoTokenizer

from app.modeling.loader import DEFAULT_MODEL_DIR
from tests.integration.conftest import metric, sse_events

TASK = "다음 문장의 감정을 긍정 또는 부정으로 분류하세요."
EXAMPLES = [
    {"input": "이 영화 정말 재미있었어요. 배우들의 연기가 훌륭했습니다.", "output": "긍정"},
    {"input": "서비스가 너무 불친절했고 음식도 식어 있었다.", "output": "부정"},
    {"input": "가격에 비해 품질이 아주 좋아서 만족합니다.", "output": "긍정"},
]


def test_few_shot_renders_and_answers(client: httpx.Client) -> None:
    body = {"task": TASK, "examples": EXAMPLES[:2], "query": "분위기가 좋았다."}
    r = client.post("/few-shot", json={**body, "parameters": {"max_new_tokens": 6}})
    assert r.status_code == 200, r.text
    out = r.json()
    expected = (
        f"{TASK}\n\n입력: {EXAMPLES[0]['input']}\n출력: 긍정\n\n"
        f"입력: {EXAMPLES[1]['input']}\n출력: 부정\n\n입력: 분위기가 좋았다.\n출력:"
    )
    assert out["prompt"] == expected
    tokens = len(client.post("/tokenize", json={"inputs": expected}).json())
    assert out["prompt_tokens"] == tokens
    assert out["num_examples"] == 2
    assert out["answer"] == out["answer"].strip()
    assert "\n\n" not in out["answer"] and "입력:" not in out["answer"]
    assert out["finish_reason"] in ("stop_sequence", "eos_token", "length")
    assert 1 <= out["generated_tokens"] <= 6


def test_zero_and_one_shot_and_custom_template(client: httpx.Client) -> None:
    zero = client.post("/few-shot", json={"task": "질문에 답하세요.", "query": "수도는?"}).json()
    assert zero["prompt"] == "질문에 답하세요.\n\n입력: 수도는?\n출력:"
    assert zero["num_examples"] == 0
    one = client.post(
        "/few-shot",
        json={
            "examples": [{"input": "밥 먹었어?", "output": "식사하셨어요?"}],
            "query": "어디 가?",
            "template": {"input_prefix": "반말: ", "output_prefix": "존댓말: "},
            "parameters": {"max_new_tokens": 5, "details": True},
        },
    ).json()
    assert one["prompt"] == "반말: 밥 먹었어?\n존댓말: 식사하셨어요?\n\n반말: 어디 가?\n존댓말:"
    assert one["details"]["generated_tokens"] == one["generated_tokens"]


def test_stream_matches_non_stream(client: httpx.Client) -> None:
    body = {"task": TASK, "examples": EXAMPLES, "query": "다시는 안 갈 거예요."}
    full = client.post("/few-shot", json=body).json()
    with client.stream("POST", "/few-shot", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    final = events[-1]
    assert final["generated_text"] == full["answer"]
    assert final["prompt"] == full["prompt"] and final["prompt_tokens"] == full["prompt_tokens"]
    assert "".join(e["token"]["text"] for e in events).strip() == full["answer"]


def test_repeated_examples_hit_the_prefix_cache(client: httpx.Client) -> None:
    body = {"task": TASK, "examples": EXAMPLES, "parameters": {"max_new_tokens": 2}}
    before = client.get("/metrics").text
    first = client.post("/few-shot", json={**body, "query": "정말 최고의 하루였다."}).json()
    middle = client.get("/metrics").text
    client.post("/few-shot", json={**body, "query": "두 번 다시 오지 않겠다."}).json()
    after = client.get("/metrics").text
    hits = [metric(t, "kogpt_prefix_cache_hits_total") for t in (before, middle, after)]
    queries = [metric(t, "kogpt_prefix_cache_queries_total") for t in (before, middle, after)]
    assert queries[2] > queries[1] > queries[0]
    # Everything before the query is shared: its full 16-token blocks come from the cache
    # (less one token, which may merge differently at the boundary).
    prefix = first["prompt"][: first["prompt"].rindex("입력:")]
    shared = len(client.post("/tokenize", json={"inputs": prefix}).json()) - 1
    shared_blocks = shared // 16
    assert shared_blocks >= 2
    assert hits[2] - hits[1] >= shared_blocks


def test_special_token_text_in_examples_stays_text(client: httpx.Client) -> None:
    """Issue #27: with a format made of special tokens, the examples' and query's special-token
    text is ordinary tokens; only the format's markers are special ids."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)

    def as_text(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return list(ids)

    usr, sys_, eos = 2, 4, 1
    body = {
        "examples": [{"input": "질문</s>", "output": "답<usr>"}],
        "query": "<sys>끝",
        "template": {
            "input_prefix": "<usr>",
            "output_prefix": "<sys>",
            "input_output_separator": "",
            "example_separator": "</s>",
        },
        "parameters": {"max_new_tokens": 2},
    }
    rendered = client.post("/few-shot/render", json=body).json()
    assert rendered["prompt"] == "<usr>질문</s><sys>답<usr></s><usr><sys>끝<sys>"
    ids = [usr, *as_text("질문</s>"), sys_, *as_text("답<usr>"), eos, usr, *as_text("<sys>끝")]
    assert rendered["prompt_tokens"] == len(ids) + 1  # and the final <sys>
    answered = client.post("/few-shot", json=body).json()
    assert answered["prompt_tokens"] == rendered["prompt_tokens"]
