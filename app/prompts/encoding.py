"""Templated prompts -> token ids, where special-token text inside contents stays text.

A template (the chat template, the few-shot format) writes its own markers (`<usr>`, `<sys>`,
`</s>`, a checkpoint template's tokens) and the tokenizer turns every occurrence of such a
string into its special id, wherever it came from: a message containing `</s><sys>` would end
its own turn and open a forged assistant turn (role injection). So the prompt records where
contents put such text (chat: the occurrences, marked before the template renders them;
few-shot: the contents' whole extents), is tokenized once exactly as a raw prompt is, and every
added-token id whose text came from a content is replaced by that text's ordinary BPE tokens.
All other ids stay as they were: the tokenizer already cuts the text at each added token, so
the pieces around a replaced token tokenize as before, and ordinary contents give the ids of
the plain call.

Tokenizer only: no torch, no web framework.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# Private-use characters around content-origin control text while a template renders it (a
# template may copy, trim or concatenate contents, so positions are only known afterwards).
# Contents lose these characters first, so a message cannot forge a marked span.
START, END = "\U000f0000", "\U000f0001"


@dataclass(frozen=True)
class PromptText:
    """A rendered prompt and where text that came from contents lies in it."""

    text: str
    # [start, end) of content-origin text: chat, the marked control text; few-shot, contents.
    spans: tuple[tuple[int, int], ...] = ()
    # Where a template operation separated a marked token from its markers (a lone marker): no
    # added token may touch one (it may be that token, or text joined across the cut).
    breaks: tuple[int, ...] = ()


class PlainTextError(ValueError):
    """A content's special-token text cannot be encoded without producing an added token."""


def control_tokens(tokenizer: Any, template_text: str = "") -> tuple[str, ...]:
    """The strings contents may not turn into tokens: every special added token, and the
    non-special added tokens the template itself writes (e.g. a checkpoint's `<|im_start|>`),
    longest first. Whitespace-only tokens are ordinary text in any template."""
    added = tokenizer.added_tokens_decoder.values()
    found = {
        t.content for t in added if t.content.strip() and (t.special or t.content in template_text)
    }
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


@lru_cache(maxsize=32)
def _patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(any control token; a marked token or a lone marker). Longest first: a token wins over
    the tokens it contains."""
    alternatives = "|".join(map(re.escape, tokens)) or "(?!)"  # (?!) never matches
    marked = re.compile(f"{START}({alternatives}){END}|[{START}{END}]")
    return re.compile(alternatives), marked


def mark(content: str, tokens: tuple[str, ...]) -> str:
    """`content` with each control-token occurrence between START and END. A content without
    any (every ordinary message) comes back unchanged, so it renders exactly as before."""
    content = content.replace(START, "").replace(END, "")
    return _patterns(tokens)[0].sub(lambda m: START + m.group(0) + END, content)


def unmark(rendered: str, tokens: tuple[str, ...]) -> PromptText:
    """The rendered text without markers, with the marked spans and lone markers' positions."""
    if START not in rendered and END not in rendered:
        return PromptText(rendered)
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    breaks: list[int] = []
    at = last = 0  # length of the clean text so far; end of the last match in `rendered`
    for m in _patterns(tokens)[1].finditer(rendered):
        pieces.append(rendered[last : m.start()])
        at += m.start() - last
        last = m.end()
        if m.group(1) is None:
            breaks.append(at)
            continue
        pieces.append(m.group(1))
        spans.append((at, at + len(m.group(1))))
        at += len(m.group(1))
    pieces.append(rendered[last:])
    return PromptText("".join(pieces), tuple(spans), tuple(breaks))


def from_parts(parts: Iterable[tuple[str, bool]]) -> PromptText:
    """A prompt built by joining (text, is_content) parts, trailing whitespace removed. Every
    content part is a span: no added token may take any of its characters (not even one that
    a content forms with the template text beside it)."""
    text, spans = "", []
    for part, is_content in parts:
        if is_content and part:
            spans.append((len(text), len(text) + len(part)))
        text += part
    text = text.rstrip()
    return PromptText(text, tuple((s, min(e, len(text))) for s, e in spans if s < len(text)))


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as ordinary tokens: the backend's normalizer, pre-tokenizer and BPE model, with
    no added-token matching. (Not `split_special_tokens=True`: that flips a flag on the shared
    backend tokenizer, which other threads may be using.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python tokenizer: its own flag is per call
        return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [text]
    if backend.pre_tokenizer is not None:
        splits = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return [token.id for piece in splits for token in backend.model.tokenize(piece)]


def _from_content(prompt: PromptText, content: str, start: int, end: int) -> bool:
    """Whether the added token `content` at [start, end) took any content character or
    touches a lone marker. Judged on the token's own text: an lstrip/rstrip token's span also
    covers the whitespace beside it, which may be a content's."""
    at = prompt.text.find(content, start, end)
    if at >= 0:
        start, end = at, at + len(content)
    return any(s < end and start < e for s, e in prompt.spans) or any(
        start <= b <= end for b in prompt.breaks
    )


def encode_prompt(tokenizer: Any, prompt: PromptText) -> list[int]:
    """The prompt's ids: the tokenizer's own (as for a raw prompt), except that each added
    token whose text came from a content is replaced by that text's ordinary tokens.
    Raises PlainTextError when the ordinary tokens would still contain an added token."""
    if not prompt.spans and not prompt.breaks:
        return list(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    enc = tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)
    added = tokenizer.added_tokens_decoder
    ids: list[int] = []
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        if token not in added or not _from_content(prompt, added[token].content, start, end):
            ids.append(token)
            continue
        text = prompt.text[start:end]  # with any whitespace an lstrip/rstrip token took
        plain = plain_ids(tokenizer, text)
        if set(plain) & set(added):  # BPE merges that rebuild an added token: cannot split
            raise PlainTextError(f"{text!r} cannot be encoded as ordinary text by this tokenizer")
        ids += plain
    return ids
