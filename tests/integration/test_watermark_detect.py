"""POST /watermark/detect: text generated with watermarking_config through the server is
detected, unwatermarked text is not, and the numbers are transformers' WatermarkDetector's.

The embedded model is tiny and peaky, so the watermark is made strong enough to dominate it
(bias 4 on a quarter of the vocabulary, 80 tokens): measured on 12 prompt/seed pairs, the
watermarked z-scores were 8.9 to 11.5 and the plain ones -0.5 to 1.9, so a threshold of 4
separates them with a wide margin on both sides.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch
from transformers import WatermarkingConfig
from transformers.generation.watermarking import WatermarkDetector

from tests.integration.conftest import LiveServer

WATERMARK = {"greenlist_ratio": 0.25, "bias": 4.0, "hashing_key": 15485863}
Z_THRESHOLD = 4.0
NEW_TOKENS = 80


def generate(client: httpx.Client, watermarked: bool) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": True,
        "seed": 7,
        "details": True,
    }
    if watermarked:
        params["watermarking_config"] = WATERMARK
    r = client.post("/generate", json={"inputs": "대한민국은", "parameters": params})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def outputs(live_server: LiveServer) -> dict[str, dict[str, Any]]:
    with httpx.Client(base_url=live_server.base_url, timeout=120) as c:
        return {"marked": generate(c, True), "plain": generate(c, False)}


def ids_of(output: dict[str, Any]) -> list[int]:
    return [t["id"] for t in output["details"]["tokens"]]


def detect(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/watermark/detect", json={"z_threshold": Z_THRESHOLD, **body})


def test_watermarked_text_is_detected(
    client: httpx.Client, outputs: dict[str, dict[str, Any]]
) -> None:
    assert len(ids_of(outputs["marked"])) == NEW_TOKENS
    assert ids_of(outputs["marked"]) != ids_of(outputs["plain"])  # the watermark changed them
    texts = [outputs["marked"]["generated_text"], outputs["plain"]["generated_text"]]
    r = detect(client, inputs=texts, watermarking_config=WATERMARK)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["prediction"] == [True, False], out
    assert out["z_score"][0] > Z_THRESHOLD > out["z_score"][1]
    assert out["green_fraction"][0] > WATERMARK["greenlist_ratio"] * 2
    assert out["p_value"][0] < 1e-4 and out["confidence"][0] > 1 - 1e-4
    assert out["z_threshold"] == Z_THRESHOLD


def test_detection_needs_the_same_config(
    client: httpx.Client, outputs: dict[str, dict[str, Any]]
) -> None:
    marked = ids_of(outputs["marked"])
    right = detect(client, input_ids=marked, watermarking_config=WATERMARK).json()
    wrong_key = {**WATERMARK, "hashing_key": WATERMARK["hashing_key"] + 1}
    wrong = detect(client, input_ids=marked, watermarking_config=wrong_key).json()
    assert right["prediction"] == [True] and wrong["prediction"] == [False]
    # A threshold above the score flips the prediction; the score itself does not change.
    above = detect(client, input_ids=marked, watermarking_config=WATERMARK,
                   z_threshold=right["z_score"][0] + 1).json()  # fmt: skip
    assert above["prediction"] == [False] and above["z_score"] == right["z_score"]


@pytest.mark.parametrize("ignore_repeated_ngrams", [False, True])
def test_numbers_equal_watermark_detector(
    client: httpx.Client,
    live_server: LiveServer,
    outputs: dict[str, dict[str, Any]],
    ignore_repeated_ngrams: bool,
) -> None:
    batch = [ids_of(outputs["marked"]), ids_of(outputs["plain"])]
    r = detect(
        client,
        input_ids=batch,
        watermarking_config=WATERMARK,
        ignore_repeated_ngrams=ignore_repeated_ngrams,
    )
    assert r.status_code == 200, r.text
    got = r.json()
    loaded = live_server.state.loaded
    detector = WatermarkDetector(
        model_config=loaded.config,
        device=str(loaded.device),
        watermarking_config=WatermarkingConfig(**WATERMARK),
        ignore_repeated_ngrams=ignore_repeated_ngrams,
    )
    want = detector(torch.tensor(batch, device=loaded.device), Z_THRESHOLD, return_dict=True)
    for name in ("num_tokens_scored", "num_green_tokens", "green_fraction", "z_score",
                 "p_value", "prediction", "confidence"):  # fmt: skip
        assert got[name] == getattr(want, name).tolist(), name


def test_selfhash_and_wider_context_match_the_detector(
    client: httpx.Client, live_server: LiveServer, outputs: dict[str, dict[str, Any]]
) -> None:
    ids = ids_of(outputs["plain"])[:30]
    cfg = {"seeding_scheme": "selfhash", "context_width": 3, "hashing_key": 99}
    got = detect(client, input_ids=ids, watermarking_config=cfg).json()
    loaded = live_server.state.loaded
    detector = WatermarkDetector(loaded.config, str(loaded.device), WatermarkingConfig(**cfg))
    want = detector(torch.tensor([ids], device=loaded.device), Z_THRESHOLD, return_dict=True)
    assert got["z_score"] == want.z_score.tolist()
    assert got["num_tokens_scored"] == want.num_tokens_scored.tolist()


def bad_config(key: str, value: Any, says: str) -> tuple[dict[str, Any], str, str]:
    return (
        {"inputs": "가나다", "watermarking_config": {key: value}},
        f"watermarking_config.{key}",
        says,
    )


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        bad_config("greenlist_ratio", 1.0, "(0, 1)"),
        bad_config("greenlist_ratio", 0, "(0, 1)"),
        bad_config("seeding_scheme", "x", "lefthash"),
        bad_config("context_width", 0, ">= 1"),
        bad_config("hashing_key", 2**64, str(2**64 - 1)),
        bad_config("hashing_key", 1.5, "integer"),
        bad_config("bias", "big", "number"),
        bad_config("colour", 1, "unknown"),
        ({"input_ids": [5, 6, 99999]}, "input_ids", "outside [0, "),
        ({"input_ids": [[5, 6], [7]]}, "input_ids.1", "context_width + 1"),
        ({"input_ids": [5, 6], "inputs": "가나"}, "inputs", "exactly one"),
        ({}, "inputs", "exactly one"),
        ({"inputs": []}, "inputs", "empty"),
        ({"inputs": "가", "z_threshold": "high"}, "z_threshold", "number"),
    ],
)
def test_bad_input_is_422_naming_the_field(
    client: httpx.Client, body: dict[str, Any], field: str, says: str
) -> None:
    r = client.post("/watermark/detect", json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["field"] == field and field in err["error"] and says in err["error"], err


def test_booleans_are_not_token_ids(client: httpx.Client) -> None:
    """JSON true/false are not ids (pydantic's lax mode read them as 1/0; schemathesis)."""
    r = client.post("/watermark/detect", json={"input_ids": [False, True]})
    assert r.status_code == 422, r.text
