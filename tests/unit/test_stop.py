"""Stop checks: eos, length, stop strings (against HF's StopStringCriteria), text truncation."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.stopping_criteria import StopStringCriteria

from app.engine.core.request import FinishReason
from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.stop import StopChecker, StopStringTextFilter, token_bytes_table
from app.options.params import SamplingParams
from tests.unit.test_detokenizer import ADDED, build_tokenizer, korean_text

STOP_SETS = [
    ["국민"],
    ["다.", "\n"],
    ["권리", "의무를", "헌법"],
    ["s>", ADDED],  # literal text of a special token, and a non-byte-alphabet added token
    ["은 모든"],
]


@functools.lru_cache(maxsize=1)
def table() -> list[bytes]:
    return token_bytes_table(build_tokenizer())


@functools.cache
def hf_criteria(stops: tuple[str, ...]) -> StopStringCriteria:
    return StopStringCriteria(tokenizer=build_tokenizer(), stop_strings=list(stops))


def params(**kw: object) -> SamplingParams:
    return SamplingParams(**{"max_length": 10_000, **kw})  # type: ignore[arg-type]


# ------------------------------------------------------------------------- eos and length


def test_eos_int_and_list() -> None:
    checker = StopChecker(params(eos_token_id=1), prompt_len=2)
    assert checker.check([5, 6, 1]) is FinishReason.EOS
    assert checker.check([5, 6, 7]) is None
    checker = StopChecker(params(eos_token_id=[1, 9]), prompt_len=2)
    assert checker.check([5, 6, 9]) is FinishReason.EOS
    # An eos inside the prompt is not a stop; only the newest token counts.
    assert StopChecker(params(eos_token_id=1), 2).check([1, 1, 7]) is None


def test_ignore_eos_and_no_eos() -> None:
    assert StopChecker(params(eos_token_id=1, ignore_eos=True), 2).check([5, 6, 1]) is None
    assert StopChecker(params(eos_token_id=None), 2).check([5, 6, 1]) is None


def test_length_limits() -> None:
    p = SamplingParams(max_new_tokens=3, max_length=5)  # max_new_tokens wins, as in HF
    checker = StopChecker(p, prompt_len=4)
    assert [checker.check([0] * n) for n in (5, 6, 7)] == [None, None, FinishReason.LENGTH]
    assert StopChecker(SamplingParams(max_length=6), 4).check([0] * 6) is FinishReason.LENGTH
    assert StopChecker(SamplingParams(), 4).check([0] * 24) is FinishReason.LENGTH  # default 20 new


def test_reason_priority_eos_then_stop_then_length() -> None:
    tok = build_tokenizer()
    ids = tok.encode("모든 국민", add_special_tokens=False)
    p = SamplingParams(max_length=len(ids) + 1, eos_token_id=1, stop_strings=["민"])
    checker = StopChecker(p, prompt_len=len(ids), token_bytes=table())
    assert checker.check([*ids, 1]) is FinishReason.EOS
    stop_ids = tok.encode("모든 국민은 민", add_special_tokens=False)
    checker = StopChecker(SamplingParams(max_length=len(stop_ids), stop_strings=["민"]), 1, table())
    assert checker.check(stop_ids) is FinishReason.STOP


def test_stop_strings_need_the_tokenizer() -> None:
    with pytest.raises(ValueError, match="token_bytes_table"):
        StopChecker(params(stop_strings=["x"]), 1)


# ------------------------------------------------------------------- stop strings vs HF


def test_token_bytes_table_matches_hf_clean_vocab() -> None:
    tok = build_tokenizer()
    words, ids = StopStringCriteria.clean_tokenizer_vocab(
        tok, stop_string_matching_mode="byte_level"
    )
    for word, idx in zip(words, ids, strict=True):
        assert table()[idx] == word, (idx, word)
    assert table()[tok.convert_tokens_to_ids(ADDED)] == ADDED.encode()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_stop_strings_match_hf_criteria_every_step(data: st.DataObject) -> None:
    tok = build_tokenizer()
    text = korean_text()
    stops = data.draw(st.sampled_from(STOP_SETS), label="stops")
    start = data.draw(st.integers(0, len(text) - 200), label="start")
    ids = tok.encode(text[start : start + 60], add_special_tokens=False)
    # Splice in random tokens: bytes, specials, the added token.
    extra = st.lists(
        st.one_of(st.integers(0, len(tok) - 1), st.sampled_from([1, 2, len(tok) - 1])),
        max_size=6,
    )
    at = data.draw(st.integers(0, len(ids)), label="at")
    ids = ids[:at] + data.draw(extra, label="extra") + ids[at:]
    prompt_len = data.draw(st.integers(1, max(1, len(ids) - 1)), label="prompt_len")
    checker = StopChecker(params(stop_strings=list(stops)), prompt_len, table())
    criteria = hf_criteria(tuple(stops))
    for end in range(prompt_len + 1, len(ids) + 1):
        want = bool(criteria(torch.tensor([ids[:end]]), None)[0])
        got = checker.check(ids[:end]) is FinishReason.STOP
        assert got == want, (tok.convert_ids_to_tokens(ids[:end]), stops)


def test_special_and_added_tokens_match_as_literal_text() -> None:
    tok = build_tokenizer()
    added = tok.convert_tokens_to_ids(ADDED)
    word = tok.encode("국민", add_special_tokens=False)
    checker = StopChecker(params(stop_strings=["s>", ADDED]), 1, table())
    criteria = hf_criteria(("s>", ADDED))
    for ids in ([*word, 1], [*word, added], [*word, 3], [1, *word]):
        want = bool(criteria(torch.tensor([ids]), None)[0])
        assert (checker.check(ids) is FinishReason.STOP) == want
        assert want == (ids[-1] in (1, added))


def test_stop_string_may_start_in_the_prompt() -> None:
    tok = build_tokenizer()
    prompt = tok.encode("모든 국", add_special_tokens=False)
    ids = prompt + tok.encode("민은", add_special_tokens=False)
    checker = StopChecker(params(stop_strings=["국민"]), len(prompt), table())
    assert checker.check(ids[: len(prompt) + 1]) is FinishReason.STOP
    assert bool(hf_criteria(("국민",))(torch.tensor([ids[: len(prompt) + 1]]), None)[0])


# --------------------------------------------------------------------- text truncation


def test_text_filter_holds_back_and_truncates() -> None:
    f = StopStringTextFilter(["STOP", "x"])
    assert f.push("hello S") == "hell"  # "o S" could still become "STOP"
    assert f.push("T") == "o"
    assert f.finish("OP and more", FinishReason.STOP) == " "
    f = StopStringTextFilter(["STOP"])
    assert f.push("ab") == "" and f.finish("cd", FinishReason.LENGTH) == "abcd"
    assert StopStringTextFilter([]).push("anything") == "anything"


def test_text_filter_context_from_prompt() -> None:
    f = StopStringTextFilter(["국민"], context="모든 국")
    assert f.finish("민은", FinishReason.STOP) == ""
    # A stop string wholly inside the already emitted text is not a reason to cut again.
    f = StopStringTextFilter(["ab"])
    assert f.push("xxab yy") == "xxab y"
    assert f.finish("zzab", FinishReason.STOP) == "yzz"


def test_stream_end_to_end_text_ends_before_stop_string() -> None:
    """Detokenizer + checker + filter as the engine wires them."""
    tok = build_tokenizer()
    text = korean_text()[:800]
    cut = text.index(" ", 10) + 1  # no stop string spans a space
    prompt = tok.encode(text[:cut], add_special_tokens=False)
    output = tok.encode(text[cut:], add_special_tokens=False)
    p = params(stop_strings=["국민", "헌법"])
    checker = StopChecker(p, len(prompt), table())
    detok = IncrementalDetokenizer(tok, prompt)
    filt = StopStringTextFilter(p.stop_strings, context=tok.decode(prompt))
    seq, pieces = list(prompt), []
    reason = None
    for t in output:
        seq.append(t)
        delta = detok.add(t)
        reason = checker.check(seq)
        if reason is not None:
            pieces.append(filt.finish(delta + detok.flush(), reason))
            break
        pieces.append(filt.push(delta))
    assert reason is FinishReason.STOP
    out_text = tok.decode(seq[len(prompt) :])
    first = min(i for s in p.stop_strings if (i := out_text.find(s)) != -1)
    assert first > 0 and "".join(pieces) == out_text[:first]
    assert out_text.endswith(("국민", "헌법")) or len(out_text) - first <= 4
