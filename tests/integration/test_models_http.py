"""Several full models over HTTP (--model NAME=PATH, a float64 server): the default model,
a fine-tune with its own generation_config, a model of another depth, and a LoRA adapter of
the fine-tune (vLLM's --lora-modules JSON with base_model_name). The OpenAI `model` and TGI's
`parameters.adapter_id` select; each answer equals its own model's `generate` with that
model's defaults; /v1/models and /info list them; unknown names are a 404 listing the served
ones; a model that cannot share the server stops the start-up with the reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from app.config import Settings
from app.modeling.loader import DEFAULT_MODEL_DIR
from app.state import ModelSetError, build_state
from tests.integration.conftest import LiveServer, metric, start_server, stop_server
from tests.lora_helpers import make_adapter, make_finetune

PROMPT = "국회는 국민의"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models-http")
    tuned = make_finetune(root / "tuned", 5, generation={"repetition_penalty": 1.3})
    return {
        "tuned": tuned,
        "shallow": make_finetune(root / "shallow", 6, config={"n_layer": 2}),
        "verse": make_adapter(root / "verse", 21, 8, 16, ["c_attn"], tuned),
    }


@pytest.fixture(scope="module")
def models_server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    verse = {"name": "verse", "path": str(checkpoints["verse"]), "base_model_name": "tuned"}
    settings = Settings(
        model=f"{DEFAULT_MODEL_DIR},tuned={checkpoints['tuned']},shallow={checkpoints['shallow']}",
        lora_modules=json.dumps(verse),
        num_kv_blocks=128,
        max_num_seqs=16,
        dtype="float64",
    )
    live = start_server(settings)
    try:
        yield live
    finally:
        stop_server(live)


@pytest.fixture()
def client(models_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=models_server.base_url, timeout=60) as c:
        yield c


def reference(model: GPT2LMHeadModel, **options: Any) -> list[int]:
    """Greedy new tokens of `model.generate` with its own generation_config's defaults."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS)
    return out[0, ids.shape[1] :].tolist()


def merged_verse(checkpoints: dict[str, Path]) -> GPT2LMHeadModel:
    from peft import PeftModel

    base = GPT2LMHeadModel.from_pretrained(checkpoints["tuned"], torch_dtype=torch.float64)
    merged = PeftModel.from_pretrained(base, checkpoints["verse"]).merge_and_unload().eval()
    return merged


def test_each_name_runs_its_own_model(
    models_server: LiveServer, client: httpx.Client, checkpoints: dict[str, Path]
) -> None:
    state = models_server.state
    own = {m.name: m.loaded.model for m in state.models}
    own["verse"] = merged_verse(checkpoints)
    expected = {name: reference(model) for name, model in own.items()}
    assert len({tuple(v) for v in expected.values()}) == 4  # four different models
    assert state.models[1].loaded.generation_config.repetition_penalty == 1.3
    for name in own:
        body = {
            "model": name,
            "prompt": PROMPT,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
        }
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        assert r.json()["choices"][0]["token_ids"] == expected[name], name
        params: dict[str, Any] = {"max_new_tokens": NEW_TOKENS, "details": True}
        if name != state.model_name:
            params["adapter_id"] = name
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": params})
        assert r.status_code == 200, r.text
        assert [t["id"] for t in r.json()["details"]["tokens"]] == expected[name], name


def test_models_and_info_list_them(models_server: LiveServer, client: httpx.Client) -> None:
    default = models_server.state.model_name
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert list(cards) == [default, "tuned", "shallow", "verse"]
    assert cards["verse"]["parent"] == "tuned" and cards["tuned"]["parent"] is None
    info = client.get("/info").json()
    assert [m["name"] for m in info["models"]] == [default, "tuned", "shallow"]
    assert [m["n_layer"] for m in info["models"]] == [4, 4, 2]
    assert info["lora_adapters"][0]["parent"] == "tuned"


def test_unknown_names_are_404_listing_the_served(client: httpx.Client) -> None:
    """With several models there is no default meaning for a name served by none."""
    r = client.post("/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    for name in ("`tuned`", "`shallow`", "`verse`"):
        assert name in error["message"]
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 404 and r.json()["field"] == "adapter_id"
    assert "`shallow`" in r.json()["error"]


def test_load_adapter_for_a_named_base(client: httpx.Client, checkpoints: dict[str, Path]) -> None:
    """base_model_name picks the model an adapter is for: the fine-tune's adapter loads on
    the default model too (same shapes) but not on the 2-layer model, nor an unknown one."""
    path = str(checkpoints["verse"])
    r = client.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "v2", "lora_path": path, "base_model_name": "shallow"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    assert "layer" in r.json()["error"]["message"]
    r = client.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "v2", "lora_path": path, "base_model_name": "nope"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "base_model_name", r.text
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "v2", "lora_path": path})
    assert r.status_code == 200, r.text
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["v2"]["parent"] == cards[next(iter(cards))]["id"]  # the default model
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "tuned", "lora_path": path})
    assert r.status_code == 400 and "model's name" in r.json()["error"]["message"]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "v2"}).status_code == 200


def test_models_that_cannot_share_a_server(tmp_path: Path) -> None:
    """Another tokenizer or another n_positions stops the start-up, naming the model."""
    longer = make_finetune(tmp_path / "longer", 1, config={"n_positions": 512})
    other_vocab = make_finetune(tmp_path / "vocab", 2)
    tokenizer_file = other_vocab / "tokenizer.json"  # one token's text changed, same size
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    vocab["^^"] = vocab.pop("^")
    tokenizer_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for entry, words in ((f"long={longer}", "n_positions"), (f"vocab={other_vocab}", "tokenizer")):
        settings = Settings(model=f"{DEFAULT_MODEL_DIR},{entry}", num_kv_blocks=64)
        with pytest.raises(ModelSetError, match=words):
            build_state(settings)
    with pytest.raises(ValueError, match="two models are named"):
        Settings(model=f"a={longer},a={other_vocab}")


def test_request_metrics_are_labelled_by_the_model_that_ran(
    models_server: LiveServer, client: httpx.Client
) -> None:
    """Request and HTTP metrics carry the full model that ran the request: an adapter's
    request counts under its base model (bounded label values, as vLLM's model_name); a
    request that selected nothing counts under the default model."""
    default = models_server.state.model_name
    # (route, name selected, tokens generated, full model that runs it)
    jobs = [
        ("/v1/completions", "shallow", 3, "shallow"),
        ("/v1/completions", "verse", 4, "tuned"),
        ("/generate", "tuned", 5, "tuned"),
        ("/generate", "verse", 6, "tuned"),
        ("/generate", default, 2, default),
    ]
    before = client.get("/metrics").text
    for route, name, tokens, _ in jobs:
        if route == "/generate":
            parameters = {"max_new_tokens": tokens, "ignore_eos": True, "adapter_id": name}
            body: dict[str, Any] = {"inputs": PROMPT, "parameters": parameters}
        else:
            body = {"model": name, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True}
        r = client.post(route, json=body)
        assert r.status_code == 200, r.text
    missing = client.post("/v1/completions", json={"model": "nope", "prompt": PROMPT})
    assert missing.status_code == 404
    after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    for model in (default, "tuned", "shallow"):
        runs = [job for job in jobs if job[3] == model]
        generated = sum(job[2] for job in runs)
        assert delta("kogpt_generation_tokens_total", model=model) == generated, model
        assert delta("kogpt_request_generation_tokens_sum", model=model) == generated, model
        assert delta("kogpt_request_prompt_tokens_count", model=model) == len(runs), model
        assert delta("kogpt_time_to_first_token_seconds_count", model=model) == len(runs)
        assert delta("kogpt_inter_token_latency_seconds_count", model=model) == generated - len(
            runs
        )
        for route in ("/v1/completions", "/generate"):
            on_route = [job for job in runs if job[0] == route]
            finished = delta(
                "kogpt_request_finish_total", model=model, endpoint=route, finish_reason="length"
            )
            assert finished == len(on_route), (model, route)
            served = delta("kogpt_requests_total", model=model, endpoint=route, status="200")
            assert served == len(on_route), (model, route)
    assert delta("kogpt_prompt_tokens_total", model="tuned") > 0
    # Selected nothing: the default model's label.
    assert delta("kogpt_requests_total", model=default, endpoint="/v1/completions", status="404")
    assert delta("kogpt_requests_total", model=default, endpoint="/metrics", status="200") == 1
    assert 'model="verse"' not in after  # adapters are in kogpt_lora_requests_info only


def test_per_model_request_gauges(models_server: LiveServer, client: httpx.Client) -> None:
    """kogpt_model_requests_running / _waiting: one series per full model, counting its
    requests; the server-wide gauges keep the default model's label."""
    state = models_server.state
    default = state.model_name
    names = [m.name for m in state.models]
    shallow = names.index("shallow")
    engine = state.engine.engine
    long_run = {
        "model": "shallow",
        "prompt": PROMPT,
        "max_tokens": state.max_total_tokens - 16,
        "ignore_eos": True,
        "stream": True,
    }
    with client.stream("POST", "/v1/completions", json=long_run) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it is generating
        text = client.get("/metrics").text
        # Still running after the scrape, so running while it was read.
        assert [request.model for request in engine.scheduler.running] == [shallow]
    for name in names:
        running = metric(text, "kogpt_model_requests_running", model=name)
        assert running == (1 if name == "shallow" else 0), name
        assert f'kogpt_model_requests_waiting{{model="{name}"}} 0.0' in text
    assert metric(text, "kogpt_requests_running", model=default) == 1
    models_server.wait_idle()
    idle = client.get("/metrics").text
    for name in names:
        assert f'kogpt_model_requests_running{{model="{name}"}} 0.0' in idle
        assert f'kogpt_model_requests_waiting{{model="{name}"}} 0.0' in idle
    assert metric(idle, "kogpt_requests_running", model=default) == 0
    assert 'kogpt_requests_running{model="shallow"}' not in idle  # the server total only
