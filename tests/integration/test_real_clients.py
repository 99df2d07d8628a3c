"""The third-party clients people point at a TGI or OpenAI-compatible server, unchanged,
against the live server: LangChain (ChatOpenAI, OpenAI, HuggingFaceEndpoint,
ChatHuggingFace), LiteLLM (openai provider, its context-window error), huggingface_hub's
InferenceClient chat without a model, and SGLang's model gateway (sglang-router) in front
of the server forwarding OpenAI requests with its own extra fields.

LangChain, LiteLLM and sglang-router run from .venv-clients (requirements/clients.lock,
`make clients`, part of `make test`): langchain-huggingface needs huggingface-hub<2 and
LiteLLM pins its own openai, while the server's transformers 5 needs hub 2."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import LiveServer, free_port

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
CLIENT_SCRIPTS = Path(__file__).resolve().parent / "clients"

needs_clients_venv = pytest.mark.skipif(
    not CLIENTS_PYTHON.exists(), reason="no .venv-clients: run `make clients` (make test does)"
)


def run_client_script(script: str, base_url: str) -> dict[str, object]:
    proc = subprocess.run(
        [str(CLIENTS_PYTHON), str(CLIENT_SCRIPTS / script), base_url],
        capture_output=True,
        text=True,
        timeout=240,
        env={
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PATH": "/usr/bin",
            "HOME": tempfile.gettempdir(),
        },
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def greedy_completion(base_url: str, prompt: str, max_tokens: int = 8) -> str:
    body = {"model": "any", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


@needs_clients_venv
def test_langchain_clients(live_server: LiveServer) -> None:
    results = run_client_script("langchain_check.py", live_server.base_url)
    assert isinstance(results["chat_openai"], str) and results["chat_openai"]
    assert results["chat_openai_stream"], "ChatOpenAI streamed no text"
    # Any model name is served by the one model, and the response names it (as TGI does).
    assert results["chat_openai_model"] == live_server.state.model_name
    assert isinstance(results["openai_llm"], str) and results["openai_llm"]
    # HuggingFaceEndpoint samples (TGI: warpers imply sampling) with its seed: replayable.
    assert results["hf_endpoint"] == results["hf_endpoint_again"]
    assert results["hf_endpoint_stream"] == results["hf_endpoint"]
    assert isinstance(results["chat_huggingface"], str) and results["chat_huggingface"]


@needs_clients_venv
def test_litellm(live_server: LiveServer) -> None:
    results = run_client_script("litellm_check.py", live_server.base_url)
    assert results["openai_chat"], "LiteLLM chat returned no text"
    assert results["openai_chat_stream"] == results["openai_chat"]
    assert results["openai_text"] == greedy_completion(live_server.base_url, "대한민국은")
    # An over-long prompt maps to LiteLLM's context-window error (its fallbacks key on it).
    assert results["context_window_error"] == "ContextWindowExceededError"


def test_inference_client_chat_without_a_model(live_server: LiveServer) -> None:
    from huggingface_hub import InferenceClient

    hub = InferenceClient(base_url=live_server.base_url, timeout=60)
    messages = [{"role": "user", "content": "안녕하세요"}]
    answer = hub.chat_completion(messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in hub.chat_completion(messages, max_tokens=8, temperature=0, stream=True)
    )
    assert streamed == answer.choices[0].message.content


@pytest.fixture(scope="module")
def sglang_router(live_server: LiveServer) -> Iterator[str]:
    """sglang-router (SGLang's model gateway) in front of the live server, cache-aware."""
    port = free_port()
    log = ROOT / ".pytest_cache" / "sglang-router.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(CLIENTS_PYTHON), "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
             "--port", str(port), "--worker-urls", live_server.base_url,
             "--policy", "cache_aware", "--log-level", "warn"],
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        # The router finds its worker in the background; until then it answers 503.
        deadline = time.monotonic() + 90
        body = {"model": "any", "prompt": "안녕", "max_tokens": 1}
        while True:
            assert proc.poll() is None, f"sglang-router exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code != 503:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"router never routed:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@needs_clients_venv
def test_openai_requests_through_sglang_router(live_server: LiveServer, sglang_router: str) -> None:
    """The router adds no_stop_trim, ignore_eos, skip_special_tokens, return_hidden_states
    (and more on chat) to every request: the answers equal the direct ones."""
    sdk = openai.OpenAI(base_url=f"{sglang_router}/v1", api_key="unused", max_retries=0)
    text = (
        sdk.completions.create(model="any", prompt="대한민국은", max_tokens=8, temperature=0)
        .choices[0]
        .text
    )
    assert text == greedy_completion(live_server.base_url, "대한민국은")
    streamed = "".join(
        chunk.choices[0].text
        for chunk in sdk.completions.create(
            model="any", prompt="대한민국은", max_tokens=8, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == text
    messages = [{"role": "user", "content": "안녕하세요"}]
    chat = sdk.chat.completions.create(model="any", messages=messages, max_tokens=8, temperature=0)
    direct = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused")
    expected = direct.chat.completions.create(
        model="any", messages=messages, max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content == expected.choices[0].message.content
