"""IncrementalDetokenizer: deltas concatenate to tokenizer.decode exactly, never a broken char."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from app.engine.detokenizer import IncrementalDetokenizer

SPECIALS = ["<s>", "</s>", "<usr>", "<pad>", "<unk>"]  # KoGPT-2's names; ids 0..4
ADDED = "<추가>"  # a non-special added token whose text is outside the byte alphabet


def korean_text() -> str:
    """The first 6000 characters of the Constitution of the Republic of Korea (public domain;
    from konlpy's corpus), committed so every machine trains the same test tokenizer."""
    return (Path(__file__).resolve().parents[1] / "data" / "constitution_excerpt.txt").read_text(
        encoding="utf-8"
    )


@functools.lru_cache(maxsize=1)
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with a small vocab (~500), so most Hangul syllables span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([korean_text()], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    hf.add_special_tokens({"additional_special_tokens": ["<usr>"]})
    hf.add_tokens([ADDED])
    return hf


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def stream(
    tok: PreTrainedTokenizerFast,
    ids: list[int],
    chunks: list[int] | None = None,
    skip: bool = True,
    prompt: list[int] | None = None,
) -> tuple[list[str], str]:
    """Feed `ids` in chunks (sizes cycle through `chunks`); check every prefix on the way."""
    final = tok.decode(ids, skip_special_tokens=skip)
    detok = IncrementalDetokenizer(tok, prompt or [], skip_special_tokens=skip)
    deltas: list[str] = []
    pos, k = 0, 0
    sizes = chunks or [1]
    while pos < len(ids):
        n = max(1, sizes[k % len(sizes)])
        deltas.append(detok.add(ids[pos : pos + n]))
        pos, k = pos + n, k + 1
        so_far = "".join(deltas)
        # Nothing emitted is ever revised: no provisional U+FFFD, no broken syllable.
        assert final.startswith(so_far), (ids, deltas)
        assert detok.num_pending_tokens <= len(ids)
    deltas.append(detok.flush())
    assert detok.flush() == ""
    return deltas, final


def test_korean_stream_has_no_replacement_chars(tokenizer: PreTrainedTokenizerFast) -> None:
    text = korean_text()[:1500]
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in pieces) > 50  # the premise: syllables split across tokens
    deltas, final = stream(tokenizer, ids)
    assert final == text and "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_window_stays_small_on_real_text(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode(korean_text()[:3000], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    worst = 0
    for i in ids:
        detok.add(i)
        worst = max(worst, detok.num_pending_tokens, len(detok._ids) - detok._prefix_offset)
    assert worst <= 8  # O(window): a held-back character spans at most a few tokens


def test_special_tokens_and_added_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode(f"국민은 {ADDED} 권리를", add_special_tokens=False)
    mixed = [1, *ids[:3], 2, *ids[3:], 1]
    for skip in (True, False):
        deltas, final = stream(tokenizer, mixed, skip=skip)
        assert "".join(deltas) == final
        assert ADDED in final and ("</s>" in final) is (not skip)


def test_special_token_inside_a_split_character(tokenizer: PreTrainedTokenizerFast) -> None:
    raw = "한".encode()  # 3 bytes; put an eos token between them
    byte_ids = tokenizer.convert_tokens_to_ids([_byte_token(b) for b in raw])
    ids = [byte_ids[0], 1, byte_ids[1], byte_ids[2]]
    for skip in (True, False):
        deltas, final = stream(tokenizer, ids, skip=skip)
        assert "".join(deltas) == final
    assert tokenizer.decode(ids, skip_special_tokens=True) == "한"


def test_prompt_ending_mid_character_is_not_decoded(tokenizer: PreTrainedTokenizerFast) -> None:
    byte_ids = tokenizer.convert_tokens_to_ids([_byte_token(b) for b in "국".encode()])
    prompt, output = [byte_ids[0]], byte_ids[1:] + tokenizer.encode("민", add_special_tokens=False)
    deltas, final = stream(tokenizer, output, prompt=prompt)
    assert "".join(deltas) == final == tokenizer.decode(output, skip_special_tokens=True)
    assert final.startswith("\ufffd")  # what decode(output_ids) gives, as HF users see it


def _byte_token(byte: int) -> str:
    from app.engine.stop import byte_decoder

    return next(ch for ch, b in byte_decoder().items() if b == byte)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_ids_concat_equals_decode(data: st.DataObject) -> None:
    tok = build_tokenizer()
    n_vocab = len(tok)
    token = st.one_of(
        st.integers(5, 260),  # single bytes: lone continuation bytes, truncated lead bytes
        st.integers(0, n_vocab - 1),
        st.sampled_from([0, 1, 2, 3, n_vocab - 1]),  # special and added tokens
    )
    ids = data.draw(st.lists(token, max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=5), label="chunks")
    skip = data.draw(st.booleans(), label="skip")
    deltas, final = stream(tok, ids, chunks, skip)
    assert "".join(deltas) == final


@settings(max_examples=100, deadline=None)
@given(start=st.integers(0, 5000), length=st.integers(1, 200), chunk=st.integers(1, 3))
def test_random_korean_slices_never_emit_replacement(start: int, length: int, chunk: int) -> None:
    tok = build_tokenizer()
    text = korean_text()[start : start + length]
    ids = tok.encode(text, add_special_tokens=False)
    deltas, final = stream(tok, ids, [chunk])
    assert "".join(deltas) == final == text
    assert not any("\ufffd" in d for d in deltas)
