"""The chat template: exact prompt text and ids for KoGPT-2 chatbot turns, and its precedence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from app.config import Settings
from app.modeling.loader import DEFAULT_MODEL_DIR
from app.prompts.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    load_template_setting,
    render_chat,
    resolve_template,
    turn_stop_token_ids,
)

SYSTEM, Q1, A1, Q2 = "너는 친절한 상담원이야.", "안녕하세요", "반가워요", "오늘 날씨 어때?"
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def test_two_turns_with_a_system_message_render_exactly(tokenizer: Any) -> None:
    template = resolve_template(None, tokenizer)
    assert template.source == "default"
    text = render_chat(tokenizer, CONVERSATION, template)
    assert text == f"{SYSTEM}<usr>{Q1}<sys>{A1}</s><usr>{Q2}<sys>"


def test_the_prompt_ids_are_the_turns_around_the_special_token_ids(tokenizer: Any) -> None:
    vocab = tokenizer.get_vocab()
    usr, sys_, eos = vocab["<usr>"], vocab["<sys>"], tokenizer.eos_token_id
    assert (usr, sys_, eos) == (2, 4, 1)  # the KoGPT-2 ids

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    text = render_chat(tokenizer, CONVERSATION, resolve_template(None, tokenizer))
    want = [*enc(SYSTEM), usr, *enc(Q1), sys_, *enc(A1), eos, usr, *enc(Q2), sys_]
    assert enc(text) == want
    # The same ids as transformers' own tokenize=True path.
    hf = tokenizer.apply_chat_template(
        CONVERSATION, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True
    )
    assert list(hf["input_ids"]) == want
    assert turn_stop_token_ids(tokenizer) == [usr]


def test_an_unknown_role_is_a_template_error(tokenizer: Any) -> None:
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        render_chat(
            tokenizer, [{"role": "tool", "content": "x"}], resolve_template(None, tokenizer)
        )


def test_setting_beats_the_tokenizer_template_which_beats_the_default(
    tokenizer: Any, tmp_path: Path
) -> None:
    own = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    inline = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    file = tmp_path / "chat.jinja"
    file.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}", encoding="utf-8")
    copy = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    copy.chat_template = own
    turn = [{"role": "user", "content": "가"}]
    assert resolve_template(None, copy).source == "tokenizer"
    assert render_chat(copy, turn, resolve_template(None, copy)) == "[user]가"
    assert render_chat(copy, turn, resolve_template(inline, copy)) == "가|"
    assert render_chat(copy, turn, resolve_template(str(file), copy)) == "<가>"
    assert render_chat(tokenizer, turn, resolve_template(None, tokenizer)) == "<usr>가<sys>"


@pytest.mark.parametrize(
    ("value", "says"),
    [("no/such/template.jinja", "neither an existing file"), ("{% for %}", "syntax error")],
)
def test_a_bad_setting_fails_at_start_with_the_reason(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        load_template_setting(value)
    with pytest.raises(ValidationError, match=says):
        Settings(chat_template=value)
