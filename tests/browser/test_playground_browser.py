"""The playground in a real browser (headless Chromium), against a live server with an API key:
the page loads without the key, takes it, builds its form from the API schema, streams a
preset token by token, stops a request, compares three strategies side by side, runs the
few-shot builder, and copies a request as a Python script that prints the same text. Then,
on a server with LoRA adapters: the model picker lists the model and its adapters (from
GET /v1/models, once the key is given), generate and few-shot run the chosen adapter, a
compare column runs an adapter beside its base with the same options and seed, and the
copied script sends the adapter too. Every text the page shows is checked against the API's
own answer for the same options, seed and adapter.

The tests share one page and run in order. KOGPT_PLAYGROUND_SCREENSHOT=docs/playground.png
also saves the compare screenshot used by the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.browser.conftest import API_KEY
from tests.integration.conftest import LiveServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
COMMON = [
    "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
    "repetition_penalty", "no_repeat_ngram_size", "seed", "stop",
]  # fmt: skip
SHARED = {"max_new_tokens": 24, "seed": 7}
TOP_P = {"do_sample": True, "top_p": 0.92, "top_k": 0}
COMPARE = [  # the compare tab's default columns, as the presets define them
    {"do_sample": False},
    {"num_beams": 5, "no_repeat_ngram_size": 2, "early_stopping": True},
    TOP_P,
]
WAIT_S = 30
CSS, ID = "css selector", "id"  # selenium's By values (selenium is imported by the fixture)


def wait_for(driver: Any, script: str, *args: Any, timeout: float = WAIT_S) -> Any:
    """Wait until the JavaScript expression `script` (with `arguments`) is truthy."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: d.execute_script(f"return {script}", *args)
    )


def set_field(driver: Any, name: str, value: str) -> None:
    driver.execute_script(
        """const input = document.querySelector(`#options-form [name="${arguments[0]}"]`);
        input.value = arguments[1];
        input.dispatchEvent(new Event("input", {bubbles: true}));""",
        name,
        value,
    )


def click(driver: Any, css: str) -> None:
    driver.find_element(CSS, css).click()


def column_result(driver: Any, column: Any) -> dict[str, Any]:
    return driver.execute_script(  # type: ignore[no-any-return]
        """const c = arguments[0], g = c.querySelector(".generated");
        return {state: c.dataset.state, text: g.textContent, nodes: g.childNodes.length,
                tokens: Number(c.dataset.tokens), stats: c.querySelector(".stats").textContent};""",
        column,
    )


def api_generate(live: LiveServer, params: dict[str, Any], prompt: str) -> dict[str, Any]:
    body = {"inputs": prompt, "parameters": {**params, "details": True}}
    r = httpx.post(f"{live.base_url}/generate", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def picker_options(driver: Any, css: str) -> list[tuple[str, str, str]]:
    """(value, parent, group label) of each option of the select at `css`."""
    rows = driver.execute_script(
        """return [...document.querySelector(arguments[0]).options]
            .map(o => [o.value, o.dataset.parent, o.parentElement.label]);""",
        css,
    )
    return [tuple(row) for row in rows]


def choose(driver: Any, select: Any, value: str) -> None:
    """Pick `value` in a <select> as a user would (it must be one of its options)."""
    chosen = driver.execute_script(
        """const s = arguments[0];
        s.value = arguments[1];
        s.dispatchEvent(new Event("change", {bubbles: true}));
        return s.value;""",
        select,
        value,
    )
    assert chosen == value


def prompt_of(driver: Any) -> str:
    return driver.execute_script("return document.getElementById('prompt').value")  # type: ignore[no-any-return]


def test_page_is_public_and_takes_the_key(browser: Any, keyed_live: LiveServer) -> None:
    browser.get(f"{keyed_live.base_url}/")
    wait_for(browser, "document.body.dataset.ready === 'true'")
    assert browser.current_url == f"{keyed_live.base_url}/playground"
    assert browser.execute_script("return document.documentElement.lang") == "ko"
    wait_for(browser, "document.getElementById('key-status').textContent.includes('API key')")
    browser.find_element(ID, "api-key").send_keys(API_KEY)
    click(browser, "#key-form button")
    wait_for(browser, "document.getElementById('key-status').textContent === 'key accepted'")
    model = browser.find_element(ID, "model-info").text
    assert model.startswith(keyed_live.state.model_name)
    assert browser.execute_script("return sessionStorage.length") == 1  # kept in this tab only
    names = browser.execute_script(
        "return [...document.querySelectorAll('#options-form .field')].map(f => f.dataset.name)"
    )
    spec = httpx.get(f"{keyed_live.base_url}/openapi.json").json()
    properties = spec["components"]["schemas"]["GenerateParameters"]["properties"]
    assert "adapter_id" in properties  # set by the model picker, not a form field
    assert sorted(names) == sorted(set(properties) - {"adapter_id"})
    assert names[: len(COMMON)] == COMMON
    # One model and no adapter: nothing to pick, the pickers stay hidden.
    wait_for(browser, "document.querySelectorAll('#model-picker option').length === 1")
    name = keyed_live.state.model_name
    assert picker_options(browser, "#model-picker") == [(name, "", name)]
    assert not browser.find_element(ID, "model-choice").is_displayed()
    assert browser.execute_script(
        "return [...document.querySelectorAll('.column-model')].every(s => s.hidden)"
    )


def test_preset_streams_the_api_answer(browser: Any, keyed_live: LiveServer) -> None:
    click(browser, '#presets button[data-preset="top-p"]')
    set_field(browser, "max_new_tokens", str(SHARED["max_new_tokens"]))
    set_field(browser, "seed", str(SHARED["seed"]))
    click(browser, "#run")
    column = browser.find_element(CSS, "#generate-output .column")
    wait_for(browser, "arguments[0].dataset.state === 'done'", column)
    shown = column_result(browser, column)
    expected = api_generate(keyed_live, {**SHARED, **TOP_P}, prompt_of(browser))
    assert shown["text"] == expected["generated_text"]
    assert shown["tokens"] == expected["details"]["generated_tokens"]
    assert shown["nodes"] == shown["tokens"]  # one text node per streamed token event
    assert "tok/s" in shown["stats"]


def test_copy_as_python_prints_the_same_text(browser: Any, keyed_live: LiveServer) -> None:
    shown = column_result(browser, browser.find_element(CSS, "#generate-output .column"))
    click(browser, "#copy-curl")
    curl = wait_for(browser, "!document.getElementById('copy-out').hidden && "
                    "document.getElementById('copy-out').textContent")  # fmt: skip
    assert "/generate_stream" in curl and "$KOGPT_API_KEY" in curl and API_KEY not in curl
    click(browser, "#copy-python")
    script = wait_for(browser, "document.getElementById('copy-out').dataset.kind === 'python' && "
                      "document.getElementById('copy-out').textContent")  # fmt: skip
    env = {**os.environ, "KOGPT_API_KEY": API_KEY, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode("utf-8") == shown["text"] + "\n"


def test_stop_aborts_the_stream(browser: Any, keyed_live: LiveServer) -> None:
    set_field(browser, "max_new_tokens", "1000")
    set_field(browser, "ignore_eos", "true")
    click(browser, "#run")
    column = browser.find_element(CSS, "#generate-output .column")
    wait_for(browser, "arguments[0].querySelector('.generated').childNodes.length > 0", column)
    click(browser, "#stop")
    wait_for(browser, "arguments[0].dataset.state === 'stopped'", column)
    assert column_result(browser, column)["stats"].startswith("stopped")
    keyed_live.wait_idle()  # the server aborted the request and freed its KV blocks
    assert browser.find_element(ID, "run").is_enabled()
    set_field(browser, "ignore_eos", "")


def test_compare_streams_side_by_side(browser: Any, keyed_live: LiveServer, tmp_path: Path) -> None:
    set_field(browser, "max_new_tokens", str(SHARED["max_new_tokens"]))
    click(browser, '.tabs button[data-tab="compare"]')
    browser.find_element(ID, "prompt").clear()
    browser.find_element(ID, "prompt").send_keys("대한민국은")
    columns = browser.find_elements(CSS, "#compare-columns .column")
    assert len(columns) == len(COMPARE)
    for column, strategy in zip(columns, COMPARE, strict=True):
        params = column.find_element(CSS, "textarea").get_attribute("value")
        assert json.loads(params) == {**SHARED, **strategy}
    click(browser, "#run")
    for column in columns:
        wait_for(browser, "arguments[0].dataset.state === 'done'", column)
    for column, strategy in zip(columns, COMPARE, strict=True):
        shown = column_result(browser, column)
        expected = api_generate(keyed_live, {**SHARED, **strategy}, "대한민국은")
        assert shown["text"] == expected["generated_text"], strategy
        assert shown["tokens"] == expected["details"]["generated_tokens"]
        streamed = "num_beams" not in strategy  # beams arrive whole, from POST /generate
        assert (shown["nodes"] > 1) == streamed or shown["tokens"] == 1
        assert ("not streamed" in shown["stats"]) != streamed
    screenshot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("KOGPT_PLAYGROUND_SCREENSHOT")
    if target:
        Path(target).write_bytes(screenshot.read_bytes())


def test_few_shot_builder_shows_the_server_prompt(browser: Any, keyed_live: LiveServer) -> None:
    click(browser, '#presets button[data-preset="greedy"]')
    set_field(browser, "max_new_tokens", "8")
    click(browser, '.tabs button[data-tab="fewshot"]')
    spec = httpx.get(f"{keyed_live.base_url}/openapi.json").json()
    example = spec["components"]["schemas"]["FewShotRequest"]["examples"][0]
    body = {key: example[key] for key in ("task", "examples", "query")}
    body["parameters"] = {"max_new_tokens": 8, "seed": SHARED["seed"], "do_sample": False}
    r = httpx.post(f"{keyed_live.base_url}/few-shot", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    expected = r.json()
    wait_for(
        browser,
        "document.getElementById('fs-prompt').textContent === arguments[0]",
        expected["prompt"],
    )
    info = browser.find_element(ID, "fs-prompt-info").text
    assert info.startswith(f"{expected['prompt_tokens']} tokens")
    click(browser, "#run")
    column = browser.find_element(CSS, "#fewshot-output .column")
    wait_for(browser, "['done', 'error'].includes(arguments[0].dataset.state)", column)
    shown = column_result(browser, column)
    assert shown["state"] == "done", shown["stats"]
    assert shown["text"] == expected["answer"]
    assert shown["tokens"] == expected["generated_tokens"]


def test_picker_lists_the_model_and_its_adapters(browser: Any, lora_live: LiveServer) -> None:
    browser.get(f"{lora_live.base_url}/playground")  # another origin: no key in this tab yet
    wait_for(browser, "document.body.dataset.ready === 'true'")
    wait_for(browser, "document.getElementById('key-status').textContent.includes('API key')")
    assert picker_options(browser, "#model-picker") == []  # GET /v1/models needs the key
    browser.find_element(ID, "api-key").send_keys(API_KEY)
    click(browser, "#key-form button")
    wait_for(browser, "document.querySelectorAll('#model-picker option').length > 1")
    cards = httpx.get(f"{lora_live.base_url}/v1/models", headers=AUTH).json()["data"]
    base = lora_live.state.model_name
    assert [(c["id"], c["parent"]) for c in cards] == [(base, None), ("poem", base), ("chat", base)]
    # The adapters under their parent, the default model first and chosen.
    expected = [(base, "", base), ("poem", base, base), ("chat", base, base)]
    assert picker_options(browser, "#model-picker") == expected
    picker = browser.find_element(ID, "model-picker")
    assert picker.is_displayed() and picker.get_attribute("value") == base
    for index in range(len(COMPARE)):  # each compare column has its own picker
        css = f'#compare-columns .column[data-column="{index}"] .column-model'
        assert picker_options(browser, css) == expected
        assert browser.find_element(CSS, css).get_attribute("value") == base


def test_generate_runs_the_chosen_adapter(browser: Any, lora_live: LiveServer) -> None:
    click(browser, '#presets button[data-preset="top-p"]')
    set_field(browser, "max_new_tokens", str(SHARED["max_new_tokens"]))
    set_field(browser, "seed", str(SHARED["seed"]))
    choose(browser, browser.find_element(ID, "model-picker"), "chat")
    click(browser, "#run")
    column = browser.find_element(CSS, "#generate-output .column")
    wait_for(browser, "['done', 'error'].includes(arguments[0].dataset.state)", column)
    shown = column_result(browser, column)
    assert shown["state"] == "done", shown["stats"]
    prompt = prompt_of(browser)
    expected = api_generate(lora_live, {**SHARED, **TOP_P, "adapter_id": "chat"}, prompt)
    assert shown["text"] == expected["generated_text"] != ""
    assert shown["tokens"] == expected["details"]["generated_tokens"]
    base = api_generate(lora_live, {**SHARED, **TOP_P}, prompt)
    assert shown["text"] != base["generated_text"]  # the adapter changes this seed's text


def test_compare_a_fine_tune_against_its_base(browser: Any, lora_live: LiveServer) -> None:
    click(browser, '.tabs button[data-tab="compare"]')
    assert not browser.find_element(ID, "model-choice").is_displayed()  # columns pick
    click(browser, "#remove-column")
    columns = browser.find_elements(CSS, "#compare-columns .column")
    assert len(columns) == 2
    for column in columns:
        choose(browser, column.find_element(CSS, ".column-preset"), "top-p")
    choose(browser, columns[1].find_element(CSS, ".column-model"), "poem")
    params = [json.loads(c.find_element(CSS, "textarea").get_attribute("value")) for c in columns]
    assert params == [{**SHARED, **TOP_P}] * 2  # same options and seed; only the model differs
    click(browser, "#run")
    for column in columns:
        wait_for(browser, "['done', 'error'].includes(arguments[0].dataset.state)", column)
    shown = [column_result(browser, column) for column in columns]
    assert [s["state"] for s in shown] == ["done", "done"], [s["stats"] for s in shown]
    prompt = prompt_of(browser)
    base = api_generate(lora_live, {**SHARED, **TOP_P}, prompt)
    poem = api_generate(lora_live, {**SHARED, **TOP_P, "adapter_id": "poem"}, prompt)
    assert shown[0]["text"] == base["generated_text"]
    assert shown[1]["text"] == poem["generated_text"]
    assert shown[0]["text"] != shown[1]["text"]
    assert [s["tokens"] for s in shown] == [
        base["details"]["generated_tokens"],
        poem["details"]["generated_tokens"],
    ]


def test_copy_as_sends_each_column_s_adapter(browser: Any, lora_live: LiveServer) -> None:
    columns = browser.find_elements(CSS, "#compare-columns .column")
    texts = [column_result(browser, column)["text"] for column in columns]
    click(browser, "#copy-curl")
    curl = wait_for(browser, "document.getElementById('copy-out').dataset.kind === 'curl' && "
                    "document.getElementById('copy-out').textContent")  # fmt: skip
    assert curl.count('"adapter_id"') == 1 and '"adapter_id":"poem"' in curl
    assert "# #2 Top-p 0.92 · poem" in curl
    click(browser, "#copy-python")
    script = wait_for(browser, "document.getElementById('copy-out').dataset.kind === 'python' && "
                      "document.getElementById('copy-out').textContent")  # fmt: skip
    assert script.count('"adapter_id": "poem"') == 1
    env = {**os.environ, "KOGPT_API_KEY": API_KEY, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode("utf-8") == "".join(f"{text}\n" for text in texts)


def test_few_shot_runs_the_chosen_adapter(browser: Any, lora_live: LiveServer) -> None:
    click(browser, '#presets button[data-preset="greedy"]')
    set_field(browser, "max_new_tokens", "8")
    click(browser, '.tabs button[data-tab="fewshot"]')
    choose(browser, browser.find_element(ID, "model-picker"), "poem")
    spec = httpx.get(f"{lora_live.base_url}/openapi.json").json()
    example = spec["components"]["schemas"]["FewShotRequest"]["examples"][0]
    body = {key: example[key] for key in ("task", "examples", "query")}
    params = {"max_new_tokens": 8, "seed": SHARED["seed"], "do_sample": False}
    answers = {}
    for adapter in ("poem", None):
        extra = {"adapter_id": adapter} if adapter else {}
        r = httpx.post(
            f"{lora_live.base_url}/few-shot",
            json={**body, "parameters": {**params, **extra}},
            headers=AUTH,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        answers[adapter] = r.json()
    wait_for(browser, "document.getElementById('fs-prompt').textContent === arguments[0]",
             answers["poem"]["prompt"])  # fmt: skip
    click(browser, "#run")
    column = browser.find_element(CSS, "#fewshot-output .column")
    wait_for(browser, "['done', 'error'].includes(arguments[0].dataset.state)", column)
    shown = column_result(browser, column)
    assert shown["state"] == "done", shown["stats"]
    assert shown["text"] == answers["poem"]["answer"] != ""
    assert shown["text"] != answers[None]["answer"]
    click(browser, "#copy-python")
    script = wait_for(browser, "document.getElementById('copy-out').dataset.kind === 'python' && "
                      "document.getElementById('copy-out').textContent")  # fmt: skip
    assert '"adapter_id": "poem"' in script and "# model: poem" in script


def test_picker_groups_several_models(browser: Any) -> None:
    """Full models (cards with no parent, the first the default) each with their adapters,
    as /v1/models lists them on a server with several models: the picker needs no change."""
    result = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        import("/playground/models.js").then(({ ModelCatalog, ModelPicker }) => {
          const catalog = new ModelCatalog();
          const picker = new ModelPicker(catalog);
          catalog.set([
            {id: "base", parent: null}, {id: "other", parent: null},
            {id: "poem", parent: "base"}, {id: "other-chat", parent: "other"},
            {id: "orphan", parent: "gone"},
          ]);
          const groups = [...picker.select.querySelectorAll("optgroup")]
            .map(g => [g.label, [...g.children].map(o => o.value)]);
          const sent = {};
          for (const value of ["base", "other", "other-chat"]) {
            picker.select.value = value;
            picker.select.dispatchEvent(new Event("change"));
            sent[value] = picker.withModel({seed: 1});
          }
          catalog.set([{id: "base", parent: null}]);  // "other-chat" is gone
          done({groups, sent, after: picker.select.value, hidden: picker.element.hidden});
        }, (error) => done({error: String(error)}));"""
    )
    assert result["groups"] == [
        ["base", ["base", "poem"]],
        ["other", ["other", "other-chat"]],
        ["gone", ["orphan"]],
    ]
    assert result["sent"] == {
        "base": {"seed": 1},  # the default model: nothing extra
        "other": {"seed": 1, "adapter_id": "other"},
        "other-chat": {"seed": 1, "adapter_id": "other-chat"},
    }
    assert result["after"] == "base" and result["hidden"] is True


def test_no_console_errors_but_the_keyless_401s(browser: Any) -> None:
    logs = browser.get_log("browser")
    errors = [e["message"] for e in logs if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert errors == []
