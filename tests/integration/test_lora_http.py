"""LoRA adapters over HTTP on a float64 server started with --lora-modules: the OpenAI
`model` and TGI's `parameters.adapter_id` select an adapter (output equal to peft's merged
model's generate), /v1/models and /info list the adapters, vLLM's load / unload routes, and
the errors (unknown name 404 listing the served ones, a path that is not a peft adapter or
an adapter of another base 400, a bad --lora-modules entry stops the start-up)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from app.config import Settings
from app.state import LoRAStartupError, build_state
from tests.integration.conftest import LiveServer, metric, start_server, stop_server
from tests.lora_helpers import make_adapters, merged_model

PROMPT = "국회는 국민의"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("lora-http"))


@pytest.fixture(scope="module")
def lora_server(adapter_dirs: dict[str, Path]) -> Iterator[LiveServer]:
    modules = " ".join(f"{name}={path}" for name, path in adapter_dirs.items())
    settings = Settings(
        num_kv_blocks=128, max_num_seqs=16, dtype="float64", lora_modules=modules, max_loras=3
    )
    live = start_server(settings)
    try:
        yield live
    finally:
        stop_server(live)


@pytest.fixture()
def lora_client(lora_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lora_server.base_url, timeout=60) as c:
        yield c


def reference(server: LiveServer, path: Path | None) -> list[int]:
    """Greedy new tokens of the merged model (the base model for None)."""
    loaded = server.state.loaded
    model = loaded.model if path is None else merged_model(path)
    ids = torch.tensor([loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS)
    return out[0, ids.shape[1] :].tolist()


def completion_ids(client: httpx.Client, model: str) -> tuple[str, list[int]]:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "return_token_ids": True,
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    return data["model"], data["choices"][0]["token_ids"]


def test_model_field_selects_the_adapter(
    lora_server: LiveServer, lora_client: httpx.Client, adapter_dirs: dict[str, Path]
) -> None:
    base_name = lora_server.state.model_name
    outputs = {}
    for name in ("poem", "chat", base_name):
        reported, ids = completion_ids(lora_client, name)
        assert reported == name
        ref = reference(lora_server, adapter_dirs.get(name))
        assert ids == ref[: len(ids)] and len(ids) == len(ref), name
        outputs[name] = ids
    assert len(set(map(tuple, outputs.values()))) == 3  # each adapter changes the output
    # Without --strict-model-name an unknown name is the base model, as before.
    assert completion_ids(lora_client, "some-other-name")[1] == outputs[base_name]
    chat = lora_client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "안녕"}], "max_tokens": 4},
    )
    assert chat.status_code == 200 and chat.json()["model"] == "chat"


def test_adapter_id_on_tgi_routes(
    lora_server: LiveServer, lora_client: httpx.Client, adapter_dirs: dict[str, Path]
) -> None:
    params = {"max_new_tokens": NEW_TOKENS, "details": True, "adapter_id": "poem"}
    r = lora_client.post("/generate", json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200, r.text
    ids = [t["id"] for t in r.json()["details"]["tokens"]]
    assert ids == reference(lora_server, adapter_dirs["poem"])
    unknown = lora_client.post(
        "/generate", json={"inputs": PROMPT, "parameters": {**params, "adapter_id": "nope"}}
    )
    body = unknown.json()
    assert unknown.status_code == 404 and body["field"] == "adapter_id"
    assert "`poem`" in body["error"] and "`chat`" in body["error"]
    # The lanes that run on transformers' model run a merged copy of base + adapter
    # (engine/merged_models.py; exact equality: tests/conformance/test_lora_conformance.py).
    for extra in (
        {"output_attentions": True},
        {"penalty_alpha": 0.6, "top_k": 4},
        {"token_healing": True},
    ):
        r = lora_client.post(
            "/generate", json={"inputs": PROMPT, "parameters": {**params, **extra}}
        )
        assert r.status_code == 200, (extra, r.text)
        ids = [t["id"] for t in r.json()["details"]["tokens"]]
        assert len(ids) == NEW_TOKENS
        if "output_attentions" in extra:  # greedy on the merged model
            assert ids == reference(lora_server, adapter_dirs["poem"])


def test_models_info_and_metrics_list_the_adapters(
    lora_server: LiveServer, lora_client: httpx.Client, adapter_dirs: dict[str, Path]
) -> None:
    base_name = lora_server.state.model_name
    cards = {m["id"]: m for m in lora_client.get("/v1/models").json()["data"]}
    assert cards["poem"]["parent"] == base_name and cards["poem"]["root"] == str(
        adapter_dirs["poem"]
    )
    assert cards["chat"]["parent"] == base_name and cards[base_name]["parent"] is None
    assert lora_client.get("/v1/models/chat").json()["parent"] == base_name
    info = lora_client.get("/info").json()
    assert {a["name"]: a["rank"] for a in info["lora_adapters"]} == {"poem": 4, "chat": 16}
    assert info["max_loras"] == 3
    text = lora_client.get("/metrics").text
    assert metric(text, "kogpt_lora_requests_info", max_lora="3") > 0


def other_base_adapter(folder: Path) -> Path:
    """A peft adapter of a GPT-2 with another width: its shapes do not fit this base."""
    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    peft_config = LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    get_peft_model(GPT2LMHeadModel(config), peft_config).save_pretrained(folder)
    return folder


def test_load_and_unload(
    lora_server: LiveServer,
    lora_client: httpx.Client,
    adapter_dirs: dict[str, Path],
    tmp_path: Path,
) -> None:
    load = "/v1/load_lora_adapter"
    unload = "/v1/unload_lora_adapter"
    r = lora_client.post(load, json={"lora_name": "late", "lora_path": str(adapter_dirs["chat"])})
    assert r.status_code == 200, r.text
    assert completion_ids(lora_client, "late") == ("late", completion_ids(lora_client, "chat")[1])
    assert "late" in {m["id"] for m in lora_client.get("/v1/models").json()["data"]}
    duplicate = lora_client.post(
        load, json={"lora_name": "late", "lora_path": str(adapter_dirs["poem"])}
    )
    assert duplicate.status_code == 400 and duplicate.json()["error"]["param"] == "lora_name"
    full = lora_client.post(
        load, json={"lora_name": "more", "lora_path": str(adapter_dirs["poem"])}
    )
    assert full.status_code == 400 and "--max-loras" in full.json()["error"]["message"]
    empty = tmp_path / "empty"
    empty.mkdir()
    not_peft = lora_client.post(load, json={"lora_name": "x", "lora_path": str(empty)})
    assert not_peft.status_code == 400 and not_peft.json()["error"]["param"] == "lora_path"
    assert "not a peft adapter" in not_peft.json()["error"]["message"]

    r = lora_client.post(unload, json={"lora_name": "late"})
    assert r.status_code == 200, r.text
    assert "late" not in {m["id"] for m in lora_client.get("/v1/models").json()["data"]}
    gone = lora_client.post(unload, json={"lora_name": "late"})
    assert gone.status_code == 404 and "poem" in gone.json()["error"]["message"]
    # A free slot again; an adapter of another base model is refused with the reason.
    other = other_base_adapter(tmp_path / "other")
    bad = lora_client.post(load, json={"lora_name": "other", "lora_path": str(other)})
    assert bad.status_code == 400 and "another base model" in bad.json()["error"]["message"]


def test_unknown_model_with_strict_name_lists_adapters(lora_server: LiveServer) -> None:
    settings = lora_server.state.settings.model_copy(update={"strict_model_name": True})
    state = dataclasses.replace(lora_server.state, settings=settings, metrics=None)
    strict = start_server(settings, state)
    try:
        r = httpx.post(
            f"{strict.base_url}/v1/completions",
            json={"model": "nope", "prompt": PROMPT, "max_tokens": 1},
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "`poem`" in r.json()["error"]["message"]
        assert completion_ids(httpx.Client(base_url=strict.base_url), "poem")[0] == "poem"
    finally:
        stop_server(strict)


def test_bad_lora_module_stops_the_start_up(tmp_path: Path) -> None:
    settings = Settings(num_kv_blocks=64, lora_modules=f"broken={tmp_path}")
    with pytest.raises(LoRAStartupError, match=f"broken={tmp_path}: .*not a peft adapter"):
        build_state(settings)
