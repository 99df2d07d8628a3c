"""Chat prompts for KoGPT-2 chatbot fine-tunes: which template, how it renders, where to stop.

KoGPT-2 chatbot fine-tunes (e.g. the widely copied KoGPT2-chatbot recipe) are trained on
`<usr>{question}<sys>{answer}</s>` turns. The built-in template renders an OpenAI message
list that way: system text first (as plain text), each user turn as `<usr>{content}`, each
assistant turn as `<sys>{content}</s>`, and `<sys>` at the end so the model writes the answer.

Precedence (first that applies):
  1. the `chat_template` setting (--chat-template / KOGPT_CHAT_TEMPLATE): a path to a Jinja
     file, or the Jinja template itself;
  2. the checkpoint tokenizer's own `chat_template` (tokenizer_config.json / chat_template.jinja);
  3. the built-in KoGPT-2 chatbot template below.
An operator's explicit choice beats the checkpoint, and a checkpoint that ships a template
knows its own format better than a generic default.

Rendering is transformers' own `tokenizer.apply_chat_template` (sandboxed Jinja, the special
tokens such as `eos_token` as variables, `add_generation_prompt`), so a template behaves here
exactly as it does in HF. Unlike HF's tokenize=True, special-token text inside a message stays
text (`render_chat_prompt` + app/prompts/encoding.py): only the template's own markers
become special ids, so a message cannot close its turn and forge another.
No torch, no web framework: Settings validates the setting with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.prompts.encoding import PromptText, control_tokens, mark, unmark

USER_TOKEN, ASSISTANT_TOKEN = "<usr>", "<sys>"

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}<usr>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}<sys>{{ message['content'] }}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<sys>{%- endif -%}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """The template a chat request renders with; `text` None = the tokenizer's own."""

    source: str  # "setting", "tokenizer" or "default"
    text: str | None


@lru_cache(maxsize=8)
def load_template_setting(value: str) -> str:
    """The `chat_template` setting's template: the file it names, or the value itself when it
    is Jinja. Raises ValueError (with the reason) for anything else or a syntax error."""
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        where = f"file {str(path)!r}"
    elif "{{" in value or "{%" in value:
        text, where = value, "template"
    else:
        raise ValueError(
            f"chat_template {value!r} is neither an existing file nor a Jinja template "
            "(a template has '{{ ... }}' or '{% ... %}')"
        )
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"chat_template {where}: Jinja syntax error line {exc.lineno}: {exc}"
        ) from exc
    return text


def resolve_template(setting: str | None, tokenizer: Any) -> ChatTemplate:
    if setting:
        return ChatTemplate("setting", load_template_setting(setting))
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplate("tokenizer", None)
    return ChatTemplate("default", DEFAULT_CHAT_TEMPLATE)


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    template: ChatTemplate,
    continue_final: bool = False,
) -> str:
    """The prompt text, ending with the generation prompt (the assistant's turn marker), or
    with `continue_final` (vLLM's continue_final_message) ending inside the last message,
    which the model then continues. Raises jinja2.TemplateError when the template rejects
    the conversation."""
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=template.text,
        tokenize=False,
        add_generation_prompt=not continue_final,
        continue_final_message=continue_final,
    )
    return str(text)


def render_chat_prompt(
    tokenizer: Any,
    messages: list[dict[str, str]],
    template: ChatTemplate,
    allow_special_tokens: bool = False,
    continue_final: bool = False,
) -> PromptText:
    """`render_chat`'s prompt, with the spans of the special-token text that came from message
    contents (for `encode_prompt`, which keeps it text). `allow_special_tokens`: no spans, so
    the prompt is tokenized as a raw prompt is (trusted callers only)."""
    if allow_special_tokens:
        return PromptText(render_chat(tokenizer, messages, template, continue_final))
    source = template.text if template.text is not None else tokenizer.get_chat_template()
    tokens = control_tokens(tokenizer, source)
    # Only the occurrences are marked: an ordinary content is passed on untouched, so a
    # template's string operations (trim, split, comparisons) see exactly what they did.
    marked = [{**m, "content": mark(m["content"], tokens)} for m in messages]
    return unmark(render_chat(tokenizer, marked, template, continue_final), tokens)


def turn_stop_token_ids(tokenizer: Any) -> list[int]:
    """`<usr>` when the vocabulary has it as one token: the model starting a new user turn
    ends the answer (the answer itself ends with eos)."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    return [vocab[USER_TOKEN]] if USER_TOKEN in vocab else []
