"""lm-evaluation-harness against the server, offline: a tiny multiple-choice task over a local
jsonl, scored by lm-eval's `local-completions` (POST /v1/completions with echo, logprobs 1,
max_tokens 1: it sums the prompt log-probs of each choice's tokens) and by its `hf` backend on
the same checkpoint. Every loglikelihood agrees within 1e-3 (float32), and every is_greedy
(lm-eval's check of each token against the top_logprobs' best) is the same. A generate_until
task (greedy, stop at a newline) gives the same generations through both."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from app.modeling.loader import DEFAULT_MODEL_DIR
from tests.integration.conftest import LiveServer

TASK = "kogpt_serve_tiny_mc"
GEN_TASK = "kogpt_serve_tiny_gen"
DOCS = [
    {"question": "대한민국의 수도는", "choices": ["서울이다.", "부산이다.", "제주도이다."]},
    {"question": "대한민국의 주권은", "choices": ["국민에게 있다.", "국회에 있다."]},
    {"question": "국회는", "choices": ["법률을 제정한다.", "노래를 부른다.", "바다를 건넌다."]},
    {"question": "모든 국민은 법 앞에", "choices": ["평등하다.", "무겁다.", "파랗다."]},
    {"question": "대통령의 임기는", "choices": ["5년으로 한다.", "하루로 한다."]},
    {"question": "제1조 대한민국은", "choices": ["민주공화국이다.", "섬나라이다.", "사과이다."]},
]  # the first choice is the answer


def write_task(root: Path) -> None:
    data = root / "docs.jsonl"
    lines = [json.dumps({**d, "answer": 0}, ensure_ascii=False) + "\n" for d in DOCS]
    data.write_text("".join(lines), "utf-8")
    (root / f"{TASK}.yaml").write_text(
        "\n".join(
            [
                f"task: {TASK}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {data}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "{{question}}"',
                'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{answer}}"',
                "metric_list:",
                "  - metric: acc",
                "",
            ]
        ),
        "utf-8",
    )


def write_generation_task(root: Path) -> None:
    (root / f"{GEN_TASK}.yaml").write_text(
        "\n".join(
            [
                f"task: {GEN_TASK}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {root / 'docs.jsonl'}",
                "test_split: test",
                "output_type: generate_until",
                'doc_to_text: "{{question}}"',
                'doc_to_target: "{{choices[0]}}"',
                "generation_kwargs:",
                '  until: ["\\n"]',
                "  max_gen_toks: 12",
                "  do_sample: false",
                "metric_list:",
                "  - metric: exact_match",
                "",
            ]
        ),
        "utf-8",
    )


def evaluate(lm: Any, include_path: Path, task: str) -> list[dict[str, Any]]:
    """lm-eval's logged samples of `task`, in document order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
        log_samples=True,
        num_fewshot=0,
    )
    assert results is not None
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def loglikelihoods(lm: Any, include_path: Path) -> list[tuple[float, bool]]:
    """(loglikelihood, is_greedy) of every (doc, choice), in the task's order."""
    samples = evaluate(lm, include_path, TASK)
    return [(float(r[0][0]), bool(r[0][1])) for s in samples for r in s["resps"]]


def generations(lm: Any, include_path: Path) -> list[str]:
    return [str(s["resps"][0][0]) for s in evaluate(lm, include_path, GEN_TASK)]


def test_local_completions_equals_hf_backend(
    live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    write_task(tmp_path)
    write_generation_task(tmp_path)
    server = LocalCompletionsAPI(
        base_url=f"{live_server.base_url}/v1/completions",
        model=live_server.state.model_name,
        tokenizer=str(DEFAULT_MODEL_DIR),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        max_retries=1,
        batch_size=4,
        max_length=1024,
    )
    hf = HFLM(pretrained=str(DEFAULT_MODEL_DIR), device="cpu", dtype="float32", batch_size=4)
    got = loglikelihoods(server, tmp_path)
    expected = loglikelihoods(hf, tmp_path)
    assert len(got) == len(expected) == sum(len(d["choices"]) for d in DOCS)
    worst = max(abs(a[0] - b[0]) for a, b in zip(got, expected, strict=True))
    assert worst <= 1e-3, worst
    assert [g for _, g in got] == [g for _, g in expected]
    assert all(ll < 0 for ll, _ in got)
    # generate_until: greedy generations through the server equal the hf backend's
    texts = generations(server, tmp_path)
    assert texts == generations(hf, tmp_path)
    assert len(texts) == len(DOCS) and any(texts)
