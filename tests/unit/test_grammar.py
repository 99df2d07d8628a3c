"""The grammar options (validation, 422 messages) and the llguidance wrapper (grammar.py):
Korean JSON and regexes over the embedded byte-level tokenizer, where a syllable's three
UTF-8 bytes are often split across tokens."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from transformers import AutoTokenizer

from app.engine.core.request import FinishReason
from app.engine.grammar import ConstraintFactory, GrammarError, TokenConstraint, token_masks
from app.engine.stop import token_bytes_table
from app.options.checks import ParamValidationError
from app.options.constraints import GrammarSpec, parse_grammar, resolve_constraints
from app.options.params import SamplingParams
from app.options.resolve import resolve_sampling_params

ROOT = Path(__file__).resolve().parents[2]
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "이름": {"type": "string", "maxLength": 8},
        "나이": {"type": "integer", "minimum": 0, "maximum": 150},
        "도시": {"enum": ["서울", "부산", "대구"]},
    },
    "required": ["이름", "나이", "도시"],
    "additionalProperties": False,
}
ADDRESS = r"(서울|부산|대구)시 [가-힣]{2,4}구 [0-9]{1,3}번지"
EOS = 1


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(ROOT / "models" / "kogpt2-mini"))


@pytest.fixture(scope="module")
def factory(tokenizer: Any) -> ConstraintFactory:
    return ConstraintFactory(tokenizer, len(tokenizer), num_threads=1)


def constraint(factory: ConstraintFactory, grammar: dict[str, Any], **params: Any) -> Any:
    spec = parse_grammar(grammar)
    made = factory.make(SamplingParams(grammar=spec, **{"eos_token_id": EOS, **params}))
    assert made is not None
    return made


def allowed(c: TokenConstraint, width: int) -> np.ndarray:
    return token_masks([c], width)[0]


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ({"type": "json", "value": PERSON}, "json"),
        ({"type": "json", "value": json.dumps(PERSON, ensure_ascii=False)}, "json"),
        ({"type": "json_object"}, "json"),
        ({"type": "json_schema", "value": {"name": "person", "schema": PERSON}}, "json"),
        ({"type": "regex", "value": ADDRESS}, "regex"),
    ],
)
def test_grammar_forms(value: dict[str, Any], kind: str) -> None:
    spec = parse_grammar(value)
    assert spec.kind == kind and spec.grammar
    if value["type"] in ("json", "json_schema"):
        assert json.loads(spec.source) == PERSON
    assert parse_grammar(spec) is spec


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"type": "regex", "value": "(서울|부산"}, "unclosed group"),
        ({"type": "regex", "value": "a{5,2}"}, "repetition"),
        ({"type": "regex", "value": ""}, "non-empty"),
        ({"type": "json", "value": {"type": "foo"}}, "foo"),
        ({"type": "json", "value": {"type": "object", "required": ["x"],
                                    "additionalProperties": False}}, "unsatisfiable"),
        ({"type": "json", "value": "{not json"}, "not valid JSON"),
        ({"type": "json", "value": [1, 2]}, "must be an object"),
        ({"type": "json"}, "needs a `value`"),
        ({"type": "xml", "value": "<a/>"}, "type must be one of"),
        ("a+", "must be an object"),
    ],
)  # fmt: skip
def test_invalid_grammars_name_the_field_with_the_library_message(value: Any, words: str) -> None:
    with pytest.raises(ParamValidationError) as err:
        parse_grammar(value)
    assert err.value.field == "grammar"
    assert words.lower() in str(err.value).lower(), str(err.value)


def test_constraints_are_refused_where_they_cannot_run() -> None:
    grammar = {"type": "regex", "value": "[0-9]+"}
    with pytest.raises(ParamValidationError) as err:
        resolve_constraints({"grammar": grammar}, 100, {"num_beams": 2})
    assert err.value.field == "grammar" and "beam" in str(err.value)
    with pytest.raises(ParamValidationError) as err:
        resolve_constraints({"allowed_token_ids": [5]}, 100, {"num_beams": 3})
    assert err.value.field == "allowed_token_ids"
    with pytest.raises(ParamValidationError) as err:
        resolve_constraints({"grammar": grammar}, 100, {"forced_bos_token_id": 4})
    assert "forced_bos_token_id" in str(err.value)


@pytest.mark.parametrize("value", [[], [5, -1], [5, 100], "5", [True]])
def test_allowed_token_ids_are_checked_against_the_vocabulary(value: Any) -> None:
    with pytest.raises(ParamValidationError) as err:
        resolve_constraints({"allowed_token_ids": value}, 100, {})
    assert err.value.field == "allowed_token_ids"


def test_resolve_sampling_params_carries_the_constraints() -> None:
    params = resolve_sampling_params(
        {"grammar": {"type": "regex", "value": "[0-9]+"}, "allowed_token_ids": [9, 7, 9]},
        {"eos_token_id": EOS},
        1024,
        4,
        vocab_size=100,
    )
    assert isinstance(params.grammar, GrammarSpec) and params.grammar.kind == "regex"
    assert params.allowed_token_ids == [7, 9]


# -- the matcher wrapper ---------------------------------------------------------------------


def feed(c: TokenConstraint, ids: list[int], width: int) -> FinishReason | None:
    """Every token must be allowed before it is fed; returns the last advance's reason."""
    reason = None
    for token in ids:
        assert reason is None, "the grammar ended before the text did"
        assert allowed(c, width)[token], token
        reason = c.advance(token, None)
    return reason


def test_korean_json_split_across_tokens_is_accepted(tokenizer: Any, factory: Any) -> None:
    text = json.dumps({"이름": "홍길동", "나이": 30, "도시": "서울"}, ensure_ascii=False,
                      separators=(",", ":"))  # fmt: skip
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    table = token_bytes_table(tokenizer)
    partial = [t for t in ids if not _is_utf8(table[t])]
    assert partial, "the test needs tokens that split a syllable's bytes"
    c = constraint(factory, {"type": "json", "value": PERSON})
    assert feed(c, ids, len(tokenizer)) is FinishReason.EOS  # "}" completes the object


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def walk(c: TokenConstraint, rng: random.Random, width: int, table: list[bytes]) -> bytes:
    """Uniformly random allowed tokens until the grammar ends (eos taken when allowed)."""
    out = b""
    for _ in range(300):
        choices = np.flatnonzero(allowed(c, width)).tolist()
        assert choices, "a constraint left no token"
        if EOS in choices and rng.random() < 0.5:
            return out
        token = rng.choice([t for t in choices if t != EOS] or [EOS])
        if token == EOS:
            return out
        out += table[token]
        if c.advance(token, None) is FinishReason.EOS:
            return out
    raise AssertionError("the walk did not end")


def test_random_walks_always_parse(tokenizer: Any, factory: Any) -> None:
    table = token_bytes_table(tokenizer)
    rng = random.Random(0)
    for _ in range(8):
        text = walk(constraint(factory, {"type": "json", "value": PERSON}), rng, 3262, table)
        jsonschema.validate(json.loads(text.decode("utf-8")), PERSON)
        text = walk(constraint(factory, {"type": "regex", "value": ADDRESS}), rng, 3262, table)
        assert re.fullmatch(ADDRESS, text.decode("utf-8")), text.decode("utf-8", "replace")


def test_eos_is_the_requests_own(tokenizer: Any, factory: Any) -> None:
    digits = {"type": "regex", "value": "[0-9]+"}
    ids = tokenizer("12", add_special_tokens=False)["input_ids"]
    plain = constraint(factory, digits)
    assert not allowed(plain, 3262)[EOS]  # nothing generated yet: the regex needs a digit
    assert feed(plain, ids, 3262) is None  # "12" accepts but could go on
    assert allowed(plain, 3262)[EOS]
    other = constraint(factory, digits, eos_token_id=[7, 8])
    feed(other, ids, 3262)
    mask = allowed(other, 3262)
    assert mask[7] and mask[8] and not mask[EOS]
    ignoring = constraint(factory, digits, ignore_eos=True)
    feed(ignoring, ids, 3262)
    mask = allowed(ignoring, 3262)
    assert not mask[EOS] and mask[ids[0]]


def test_masks_cover_a_wider_lm_head(tokenizer: Any) -> None:
    wide = ConstraintFactory(tokenizer, 4000, num_threads=1)
    c = constraint(wide, {"type": "json_object"})
    mask = allowed(c, 4000)
    assert mask.shape == (4000,) and mask[:3262].any() and not mask[3262:].any()


def test_allowed_token_ids_and_grammar_intersect(tokenizer: Any, factory: Any) -> None:
    only = factory.make(SamplingParams(allowed_token_ids=[5, 9, 300], eos_token_id=EOS))
    assert only is not None
    assert np.flatnonzero(allowed(only, 3262)).tolist() == [5, 9, 300]
    digit = tokenizer("7", add_special_tokens=False)["input_ids"][0]
    spec = parse_grammar({"type": "regex", "value": "[0-9]+"})
    both = factory.make(SamplingParams(grammar=spec, allowed_token_ids=[digit, 5]))
    assert both is not None
    assert np.flatnonzero(allowed(both, 3262)).tolist() == [digit]


def test_siblings_share_nothing_and_a_refused_token_raises(tokenizer: Any, factory: Any) -> None:
    a = constraint(factory, {"type": "regex", "value": "(서울|부산)"})
    b = constraint(factory, {"type": "regex", "value": "(서울|부산)"})
    seoul = tokenizer("서울", add_special_tokens=False)["input_ids"]
    masks = token_masks([a, a, b], 3262)  # a request's first token: one matcher, n rows
    assert (masks[0] == masks[1]).all() and (masks[0] == masks[2]).all()
    feed(a, seoul, 3262)
    assert not (token_masks([a], 3262)[0] == token_masks([b], 3262)[0]).all()
    with pytest.raises(GrammarError, match="refused"):
        b.advance(5, None)  # <unk>: a special token no grammar allows
    assert a.advance(123, FinishReason.LENGTH) is FinishReason.LENGTH  # ends anyway: not fed
