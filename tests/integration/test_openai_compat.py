"""The OpenAI / vLLM surface that real clients and gateways rely on (issue #20): every field
of the installed `openai` package's create params accepted, vLLM's and sglang-router's extra
fields with their meaning, OpenAI's error shapes, any model name with one model served,
logprobs up to 20, usage only with include_usage, and vLLM's /tokenize and /detokenize."""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from tests.integration.conftest import LiveServer, sse_events, start_server, stop_server
from tests.integration.log_capture import server_logs

PROMPT = "대한민국은"
EOS, SYS = 1, 4  # the embedded tokenizer's </s> and <sys>
CHAT = [{"role": "user", "content": "안녕하세요"}]
FUNCTION = {"name": "weather", "parameters": {"type": "object", "properties": {}}}
TOOL = {"type": "function", "function": FUNCTION}

# A typical value of every field of the installed SDK's params (the fields to send with it:
# top_logprobs needs logprobs, as on OpenAI). A field the SDK adds later fails the walk until
# it is given a value here and is served or ignored.
COMPLETION_FIELDS: dict[str, dict[str, Any]] = {
    "best_of": {"best_of": 2},
    "echo": {"echo": True},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "logit_bias": {"logit_bias": {"100": 1.0}},
    "logprobs": {"logprobs": 2},
    "max_tokens": {"max_tokens": 3},
    "model": {"model": "gpt-3.5-turbo-instruct"},
    "n": {"n": 2},
    "presence_penalty": {"presence_penalty": 0.5},
    "prompt": {"prompt": ["국회는", "법률은"]},
    "seed": {"seed": 7},
    "stop": {"stop": ["."]},
    "stream": {"stream": True},
    "stream_options": {"stream": True, "stream_options": {"include_usage": True}},
    "suffix": {"suffix": "입니다."},
    "temperature": {"temperature": 0.7},
    "top_p": {"top_p": 0.9},
    "user": {"user": "user-1"},
}
CHAT_FIELDS: dict[str, dict[str, Any]] = {
    "audio": {"audio": {"voice": "alloy", "format": "wav"}},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "function_call": {"function_call": "auto"},
    "functions": {"functions": [FUNCTION]},
    "logit_bias": {"logit_bias": {"100": 1.0}},
    "logprobs": {"logprobs": True},
    "max_completion_tokens": {"max_completion_tokens": 3},
    "max_tokens": {"max_tokens": 3},
    "messages": {"messages": [{"role": "system", "content": "짧게"}, *CHAT]},
    "metadata": {"metadata": {"team": "search"}},
    "modalities": {"modalities": ["text"]},
    "model": {"model": "gpt-4o"},
    "moderation": {"moderation": {"model": "omni-moderation-latest"}},
    "n": {"n": 2},
    "parallel_tool_calls": {"parallel_tool_calls": False},
    "prediction": {"prediction": {"type": "content", "content": "안녕하세요"}},
    "presence_penalty": {"presence_penalty": 0.5},
    "prompt_cache_key": {"prompt_cache_key": "session-1"},
    "prompt_cache_options": {"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}},
    "prompt_cache_retention": {"prompt_cache_retention": "24h"},
    "reasoning_effort": {"reasoning_effort": "low"},
    "response_format": {"response_format": {"type": "json_object"}},
    "safety_identifier": {"safety_identifier": "user-hash"},
    "seed": {"seed": 7},
    "service_tier": {"service_tier": "auto"},
    "stop": {"stop": ["."]},
    "store": {"store": False},
    "stream": {"stream": True},
    "stream_options": {"stream": True, "stream_options": {"include_usage": True}},
    "temperature": {"temperature": 0.7},
    "tool_choice": {"tool_choice": "auto"},
    "tools": {"tools": [TOOL]},
    "top_logprobs": {"logprobs": True, "top_logprobs": 3},
    "top_p": {"top_p": 0.9},
    "user": {"user": "user-1"},
    "verbosity": {"verbosity": "low"},
    "web_search_options": {"web_search_options": {"search_context_size": "low"}},
}
# Refused on their own, with the field named: an insertion (`suffix`, as vLLM refuses it) and
# tool / function calling (with OpenAI's default tool_choice "auto").
REFUSED = {"suffix": "not supported", "tools": "tool calling", "functions": "function calling"}


def sdk_fields(params: Any) -> set[str]:
    return set(typing.get_type_hints(params.CompletionCreateParamsNonStreaming))


def status_and_error(r: httpx.Response) -> tuple[int, dict[str, Any] | None]:
    if r.status_code != 200:
        return r.status_code, r.json()["error"]
    if r.headers["content-type"].startswith("text/event-stream"):
        events = list(sse_events(r.text.splitlines()))
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), r.text
    return 200, None


def walk(client: httpx.Client, path: str, base: dict[str, Any], name: str, sent: dict) -> None:
    r = client.post(path, json={**base, **sent})
    status, error = status_and_error(r)
    if name in REFUSED:
        assert status == 400 and error is not None, (name, r.text)
        assert error["param"] == name and REFUSED[name] in error["message"], error
        assert error["type"] == "invalid_request_error", error
    else:
        assert status == 200, (name, r.text)


@pytest.mark.parametrize("name", sorted(sdk_fields(completion_create_params)))
def test_every_openai_completion_field_is_accepted(client: httpx.Client, name: str) -> None:
    assert name in COMPLETION_FIELDS, f"no typical value for the SDK's new field `{name}`"
    walk(
        client,
        "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 3},
        name,
        COMPLETION_FIELDS[name],
    )


@pytest.mark.parametrize("name", sorted(sdk_fields(chat_create_params)))
def test_every_openai_chat_field_is_accepted(client: httpx.Client, name: str) -> None:
    assert name in CHAT_FIELDS, f"no typical value for the SDK's new field `{name}`"
    walk(
        client, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3}, name, CHAT_FIELDS[name]
    )


def test_ignored_fields_are_logged_at_debug(client: httpx.Client) -> None:
    body = {"messages": CHAT, "max_tokens": 2, "metadata": {"a": "b"}, "store": True}
    with server_logs(logging.DEBUG) as records:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    ignored = [r.getMessage() for r in records.records if "ignoring" in r.getMessage()]
    assert ignored and "metadata" in ignored[0] and "store" in ignored[0], records.text()
    assert all(r.levelno == logging.DEBUG for r in records.records if "ignoring" in r.getMessage())


def test_tools_with_tool_choice_none_are_ignored(client: httpx.Client) -> None:
    body = {"messages": CHAT, "max_tokens": 2, "tools": [TOOL], "tool_choice": "none"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    body = {"messages": CHAT, "max_tokens": 2, "functions": [FUNCTION], "function_call": "none"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    r = client.post(
        "/v1/chat/completions", json={**body, "tools": [TOOL], "tool_choice": "required"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


@pytest.fixture(scope="module")
def oai(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="x", max_retries=0) as c:
        yield c


def test_sdk_raises_bad_request_naming_the_closest_option(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(
            model="m", prompt=PROMPT, max_tokens=2, extra_body={"repetiton_penalty": 1.2}
        )
    err = info.value
    assert err.param == "repetiton_penalty" and err.type == "invalid_request_error"
    assert "did you mean `repetition_penalty`" in err.message, err.message
    with pytest.raises(openai.BadRequestError, match="tool calling is not supported"):
        oai.chat.completions.create(model="m", messages=CHAT, tools=[TOOL])  # type: ignore[list-item]


def greedy(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    r = client.post("/v1/completions", json={**body, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_return_token_ids(client: httpx.Client) -> None:
    done = greedy(client)
    choice = done["choices"][0]
    prompt_ids = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert choice["prompt_token_ids"] == prompt_ids
    assert len(choice["token_ids"]) == done["usage"]["completion_tokens"] == 6
    assert client.post("/detokenize", json={"tokens": choice["token_ids"]}).json() == {
        "prompt": choice["text"]
    }
    chat = {"messages": CHAT, "max_tokens": 3, "temperature": 0, "return_token_ids": True}
    answer = client.post("/v1/chat/completions", json=chat).json()
    assert len(answer["prompt_token_ids"]) == answer["usage"]["prompt_tokens"]
    assert len(answer["choices"][0]["token_ids"]) == answer["usage"]["completion_tokens"]
    plain = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).json()
    assert plain["choices"][0]["token_ids"] is None


def test_stop_token_ids_min_tokens_and_ignore_eos(client: httpx.Client) -> None:
    ids = greedy(client)["choices"][0]["token_ids"]
    stopped = greedy(client, stop_token_ids=[ids[1]])
    assert stopped["choices"][0]["token_ids"] == ids[:2]  # the stop token stays, as in vLLM
    assert stopped["choices"][0]["finish_reason"] == "stop"
    # min_tokens masks the stop ids until it is reached (the output then differs from greedy).
    held = greedy(client, stop_token_ids=[ids[0]], min_tokens=3)["choices"][0]
    assert ids[0] not in held["token_ids"][:3] and len(held["token_ids"]) >= 3
    # ignore_eos drops eos, not stop_token_ids (vLLM).
    both = greedy(client, stop_token_ids=[ids[1]], ignore_eos=True)["choices"][0]
    assert both["token_ids"] == ids[:2] and both["finish_reason"] == "stop"
    chat = {"messages": CHAT, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    first = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["token_ids"]
    cut = client.post("/v1/chat/completions", json={**chat, "stop_token_ids": [first[0]]})
    assert cut.json()["choices"][0]["token_ids"] == first[:1], cut.text


def test_include_stop_str_in_output_and_no_stop_trim(client: httpx.Client) -> None:
    text = greedy(client, max_tokens=12)["choices"][0]["text"]
    stop = text.strip()[2:4]
    assert stop and stop in text
    cut = greedy(client, max_tokens=12, stop=[stop])["choices"][0]["text"]
    assert cut == text[: text.index(stop)]
    for flag in ("include_stop_str_in_output", "no_stop_trim"):
        kept = greedy(client, max_tokens=12, stop=[stop], **{flag: True})["choices"][0]["text"]
        assert kept.startswith(cut + stop) and text.startswith(kept), (flag, kept)
    off = greedy(client, max_tokens=12, stop=[stop], no_stop_trim=False)["choices"][0]["text"]
    assert off == cut


def test_skip_special_tokens(client: httpx.Client, live_server: LiveServer) -> None:
    eos = live_server.state.tokenizer.eos_token_id
    forced = {"logit_bias": {str(eos): 100}, "ignore_eos": True, "max_tokens": 2}
    skipped = greedy(client, **forced)["choices"][0]
    assert skipped["token_ids"] == [eos, eos] and skipped["text"] == ""
    shown = greedy(client, **forced, skip_special_tokens=False)["choices"][0]
    assert shown["text"] == live_server.state.tokenizer.decode([eos, eos])


def test_truncate_prompt_tokens_and_max_completion_tokens(
    client: httpx.Client, live_server: LiveServer
) -> None:
    ids = client.post("/tokenize", json={"prompt": "모든 국민은 법 앞에 평등하다."}).json()[
        "tokens"
    ]
    body = {"prompt": ids, "max_tokens": 3, "temperature": 0}
    kept = client.post("/v1/completions", json={**body, "truncate_prompt_tokens": 2}).json()
    tail = client.post("/v1/completions", json={**body, "prompt": ids[-2:]}).json()
    assert kept["usage"]["prompt_tokens"] == 2 and kept["choices"] == tail["choices"]
    too_long = {"prompt": [5] * (live_server.state.max_input_tokens + 50), "max_tokens": 1}
    r = client.post("/v1/completions", json={**too_long, "truncate_prompt_tokens": -1})
    assert (
        r.status_code == 200
        and r.json()["usage"]["prompt_tokens"] == live_server.state.max_input_tokens
    )
    r = client.post("/v1/completions", json={**body, "max_completion_tokens": 5})
    assert r.json()["usage"]["completion_tokens"] == 5


def test_continue_final_message_continues_the_last_message(client: httpx.Client) -> None:
    messages = [*CHAT, {"role": "assistant", "content": "대한민국의 수도는"}]
    tokens = client.post(
        "/tokenize", json={"messages": messages, "continue_final_message": True}
    ).json()
    chat = {"messages": messages, "max_tokens": 4, "temperature": 0, "continue_final_message": True}
    answer = client.post("/v1/chat/completions", json=chat).json()
    assert answer["usage"]["prompt_tokens"] == tokens["count"]
    # The built-in template closes the message (</s>) and opens the next answer (<sys>);
    # continued, the prompt ends with the message's own text.
    plain = client.post("/tokenize", json={"messages": messages}).json()
    assert tokens["tokens"] == plain["tokens"][:-2] and plain["tokens"][-2:] == [EOS, SYS]
    raw = {"prompt": tokens["tokens"], "max_tokens": 4, "temperature": 0}
    text = client.post("/v1/completions", json=raw).json()["choices"][0]["text"]
    content = answer["choices"][0]["message"]["content"]
    assert content and text.startswith(content)
    # vLLM's chat echo: the continued message comes whole.
    echoed = client.post("/v1/chat/completions", json={**chat, "echo": True}).json()
    assert echoed["choices"][0]["message"]["content"] == "대한민국의 수도는" + content
    stream = {**chat, "echo": True, "stream": True}
    events = [
        e for e in sse_events(client.post("/v1/chat/completions", json=stream).text.splitlines())
    ]
    deltas = [e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]]
    assert "".join(deltas) == "대한민국의 수도는" + content


def test_sglang_router_forwarded_requests(client: httpx.Client) -> None:
    """What sglang-router adds to every request it forwards (issue #20)."""
    added = {
        "no_stop_trim": False,
        "ignore_eos": False,
        "skip_special_tokens": True,
        "return_hidden_states": False,
    }
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, **added})
    assert r.status_code == 200, r.text
    chat = {
        "messages": CHAT,
        **added,
        "max_completion_tokens": 3,
        "continue_final_message": False,
        "separate_reasoning": True,
        "stream_reasoning": True,
    }
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3, r.text
    r = client.post("/v1/completions", json={"prompt": PROMPT, "return_hidden_states": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_hidden_states"


def test_logprobs_up_to_20(client: httpx.Client) -> None:
    done = greedy(client, logprobs=20, max_tokens=2)["choices"][0]["logprobs"]
    assert [len(top) for top in done["top_logprobs"]] == [20, 20]
    r = client.post("/v1/completions", json={"prompt": PROMPT, "logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    chat = {"messages": CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 20}
    content = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]
    assert [len(t["top_logprobs"]) for t in content["content"]] == [20] * len(content["content"])
    r = client.post("/v1/chat/completions", json={**chat, "top_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_usage_only_with_include_usage(client: httpx.Client, path: str) -> None:
    body = {"max_tokens": 3, "stream": True, "n": 2, "temperature": 0.8}
    body |= {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT}
    plain = [e for e in sse_events(client.post(path, json=body).text.splitlines()) if e != "[DONE]"]
    assert plain and all(e["usage"] is None and e["choices"] for e in plain)
    with_usage = {**body, "stream_options": {"include_usage": True}}
    events = [e for e in sse_events(client.post(path, json=with_usage).text.splitlines())]
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]
    assert all(e["usage"] is None for e in events[:-2])


def test_tokenize_and_detokenize_bodies(client: httpx.Client, live_server: LiveServer) -> None:
    tgi = client.post("/tokenize", json={"inputs": PROMPT}).json()
    assert isinstance(tgi, list)  # TGI's answer: the bare list
    assert set(tgi[0]) == {"id", "text", "start", "stop"}
    assert "".join(t["text"] for t in tgi) == PROMPT
    assert [PROMPT[t["start"] : t["stop"]] for t in tgi] == [t["text"] for t in tgi]
    ids = [t["id"] for t in tgi]
    vllm = client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert vllm["tokens"] == ids and vllm["count"] == len(ids)
    assert vllm["max_model_len"] == live_server.state.max_total_tokens
    assert vllm["token_strs"] == live_server.state.tokenizer.convert_ids_to_tokens(ids)
    chat = client.post("/tokenize", json={"model": "x", "messages": CHAT}).json()
    answer = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()
    assert chat["count"] == answer["usage"]["prompt_tokens"]
    assert client.post("/detokenize", json={"ids": ids}).json() == {"text": PROMPT}
    assert client.post("/detokenize", json={"tokens": ids, "model": "x"}).json() == {
        "prompt": PROMPT
    }
    for bad in ({"inputs": PROMPT, "prompt": PROMPT}, {}):
        r = client.post("/tokenize", json=bad)
        assert r.status_code == 422 and r.json()["field"] == "body", r.text  # TGI's envelope
    r = client.post("/detokenize", json={"tokens": [-1]})
    assert r.status_code == 422 and r.json()["field"] == "tokens"


def named_server(base: LiveServer, **update: Any) -> LiveServer:
    settings = base.state.settings.model_copy(update=update)
    default = dataclasses.replace(base.state.models[0], names=settings.served_model_names)
    state = dataclasses.replace(
        base.state,
        settings=settings,
        model_name=settings.served_model_names[0],
        metrics=None,
        models=[default, *base.state.models[1:]],
    )
    return start_server(settings, state)


@pytest.fixture(scope="module")
def aliased(live_server: LiveServer) -> Iterator[LiveServer]:
    live = named_server(live_server, served_model_name="kogpt2-chat, kogpt2")
    try:
        yield live
    finally:
        stop_server(live)


@pytest.fixture(scope="module")
def strict(live_server: LiveServer) -> Iterator[LiveServer]:
    live = named_server(live_server, served_model_name="kogpt2-chat,kogpt2", strict_model_name=True)
    try:
        yield live
    finally:
        stop_server(live)


def test_model_aliases_and_any_name(aliased: LiveServer) -> None:
    url = aliased.base_url
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [
        "kogpt2-chat",
        "kogpt2",
    ]
    for name in ("kogpt2", "tgi", "dummy"):
        for path, body in (
            ("/v1/completions", {"prompt": PROMPT, "max_tokens": 1}),
            ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
        ):
            r = httpx.post(f"{url}{path}", json={**body, "model": name}, timeout=60)
            assert r.status_code == 200 and r.json()["model"] == "kogpt2-chat", r.text
    assert httpx.get(f"{url}/v1/models/kogpt2").json()["id"] == "kogpt2"
    r = httpx.get(f"{url}/v1/models/tgi")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_strict_model_name_keeps_404(strict: LiveServer) -> None:
    oai = openai.OpenAI(base_url=f"{strict.base_url}/v1", api_key="x", max_retries=0)
    assert (
        oai.completions.create(model="kogpt2", prompt=PROMPT, max_tokens=1).model == "kogpt2-chat"
    )
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="tgi", messages=CHAT, max_tokens=1)  # type: ignore[list-item]
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert info.value.type == "invalid_request_error"


def test_top_k_minus_one_is_vllms_no_top_k(client: httpx.Client) -> None:
    """vLLM's /v1 routes read top_k -1 as "no top-k": the same draws as top_k 0 (HF's off)."""
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 11}
    texts = []
    for top_k in (-1, 0, None):
        extra = {} if top_k is None else {"top_k": top_k}
        r = client.post("/v1/completions", json={**body, **extra})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1] == texts[2]
    r = client.post("/v1/completions", json={**body, "top_k": -2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text
