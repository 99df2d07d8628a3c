"""The option registry (app/options/registry.py) classifies every generate option, stays in
step with transformers, the engine and the tests that cover it (tests/unit/option_coverage.py),
and is the one source of the request schema, docs/options.md, the routing (split_options) and
the resolve step's ranges: each option's bounds are written once in app/."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest
from transformers import GenerationConfig

from app.api.options import OPTION_NAMES
from app.api.protocol.tgi import GenerateParameters, GenerateRequest
from app.options.checks import ParamValidationError
from app.options.docs import markdown
from app.options.ranges import Range
from app.options.registry import (
    CLASSES,
    GENERATION_CONFIG_CLASSES,
    IGNORED,
    LANES,
    NO_LANE,
    NOT_YET,
    OPTIONS,
    REJECTED,
    SERVED,
    STATUSES,
)
from app.options.resolve import ACCEPTED_OPTIONS, resolve_sampling_params
from app.options.routing import split_options
from tests.unit.option_coverage import COVERAGE

ROOT = Path(__file__).resolve().parents[2]
GENERATION_CONFIG_FIELDS = {
    k for k in GenerationConfig().to_dict() if not k.startswith("_") and k != "transformers_version"
}
HTTP_FIELDS = set(GenerateParameters.model_fields) | {"input_ids"}
CHECKPOINT = {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 3}


def test_every_generation_config_field_is_classified() -> None:
    missing = GENERATION_CONFIG_FIELDS - set(OPTIONS)
    assert not missing, f"GenerationConfig fields the registry does not classify: {missing}"


def test_registry_lists_no_field_generation_config_lacks() -> None:
    for name, opt in OPTIONS.items():
        in_config = name in GENERATION_CONFIG_FIELDS
        assert in_config == (opt.cls in GENERATION_CONFIG_CLASSES), (name, opt.cls)


def test_registry_matches_the_http_fields() -> None:
    assert set(OPTION_NAMES) <= set(OPTIONS), set(OPTION_NAMES) - set(OPTIONS)
    assert set(OPTIONS) == HTTP_FIELDS, set(OPTIONS) ^ HTTP_FIELDS
    assert "input_ids" in GenerateRequest.model_fields


def test_entries_are_well_formed() -> None:
    for name, opt in OPTIONS.items():
        assert opt.cls in CLASSES and opt.status in STATUSES, name
        assert opt.description and opt.range_text and opt.default_doc, name
        if opt.status == SERVED:
            assert opt.lane in LANES, name
        else:
            assert opt.lane == NO_LANE, name
        if opt.status in (REJECTED, NOT_YET):
            assert opt.note, f"{name}: a refusal needs its reason"


def test_defaults_are_transformers_defaults() -> None:
    """The registry's defaults (what the resolve step fills in) are GenerationConfig's, and a
    refused option's neutral values include them."""
    hf = GenerationConfig._get_default_generation_params()
    for name, opt in OPTIONS.items():
        if opt.cls not in GENERATION_CONFIG_CLASSES:
            continue
        if name in hf:
            assert opt.default == hf[name] and type(opt.default) is type(hf[name]), name
        else:
            assert opt.default in (None, False), (name, opt.default)
        if opt.status in (REJECTED, NOT_YET):
            assert hf.get(name) is None or hf[name] in opt.neutral, (name, hf.get(name))


def test_every_option_is_covered_by_tests_that_exist() -> None:
    assert set(COVERAGE) == set(OPTIONS), set(COVERAGE) ^ set(OPTIONS)
    for name, nodes in COVERAGE.items():
        assert nodes, name
        for node in nodes:
            path, _, function = node.partition("::")
            assert (ROOT / path).is_file(), (name, node)
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert callable(getattr(module, function, None)), (name, node)


def engine_served() -> list[str]:
    return [n for n, o in OPTIONS.items() if o.status == SERVED and o.lane == "engine"]


@pytest.mark.parametrize("name", engine_served())
def test_engine_served_options_are_accepted_by_resolve(name: str) -> None:
    opt = OPTIONS[name]
    assert opt.example is not None and name in opt.example, name
    assert name in ACCEPTED_OPTIONS, name
    params = resolve_sampling_params(
        {"max_new_tokens": 8, **opt.example},
        CHECKPOINT,
        1024,
        4,
        encode=lambda text: [5, 6],
        vocab_size=1000,
    )
    if name in ("seed", "temperature", "top_k", "top_p", "num_beams", "min_length"):
        assert getattr(params, name) == opt.example[name]


def test_options_the_engine_does_not_serve_are_not_marked_served() -> None:
    """Fails when the engine starts serving an option the registry still refuses or drops:
    then the registry (and docs/options.md) must be updated."""
    for name, opt in OPTIONS.items():
        if opt.status != SERVED:
            assert name not in ACCEPTED_OPTIONS, f"the engine serves `{name}` now: update it"


# -- the request schema is generated from the registry ------------------------------------
def _schema_property(name: str) -> dict[str, Any]:
    schema = GenerateRequest.model_json_schema()
    params = schema["$defs"]["GenerateParameters"]["properties"]
    return params[name] if name in params else schema["properties"][name]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_schema_field_comes_from_the_registry(name: str) -> None:
    opt = OPTIONS[name]
    prop = _schema_property(name)
    assert prop["description"] == opt.description
    assert prop.get("default") == opt.wire_default
    members = prop.get("anyOf", [prop])
    expected = opt.range.schema_kwargs() if opt.range is not None else {}
    words = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    found = {k: m[words[k]] for m in members for k in words if words[k] in m}
    assert found == expected, (name, found, expected)


def test_range_is_enforced_by_the_schema_and_the_resolve_step() -> None:
    bounds = Range(gt=0, le=1)
    assert bounds.check_float("x", 1) == 1.0 and bounds.text == "in (0, 1]"
    for bad in (0, 1.5):
        with pytest.raises(ParamValidationError, match=r"`x` must be in \(0, 1\], got"):
            bounds.check_float("x", bad)
    for name in ("top_p", "top_k", "repetition_penalty", "max_time", "typical_p"):
        opt = OPTIONS[name]
        assert opt.range is not None
        below = (opt.range.lower or 0) - 1
        with pytest.raises(ParamValidationError) as err:
            resolve_sampling_params({name: below}, CHECKPOINT, 1024, 4)
        assert err.value.field == name and opt.range.text in err.value.message


# -- each option's bounds are written once in app/ ------------------------------------------
APP = ROOT / "app"
BOUND_KEYWORDS = {"ge", "gt", "le", "lt"}
# Literal bounds allowed outside the registry: server settings and OpenAI's own wire fields,
# which are not generate options.
OWN_BOUNDS = {
    ("app/config.py", None),
    ("app/api/protocol/openai.py", "max_tokens"),  # OpenAI's: 0 allowed (with echo)
    ("app/api/protocol/openai.py", "truncate_prompt_tokens"),  # vLLM's: -1 = the most
    # vLLM's prompt log-probs: a request field, not a generate option of the registry
    ("app/api/protocol/openai.py", "prompt_logprobs"),
}


def _sources() -> list[tuple[str, ast.AST, str]]:
    out = []
    for path in sorted(APP.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        out.append((rel, ast.parse(text), text))
    return out


def _literal_bound_fields(tree: ast.AST) -> list[tuple[str | None, str]]:
    """(field name or None, keyword) of every call with a literal ge / gt / le / lt keyword;
    the field is the annotated name the call is assigned to (`top_k: int = Field(ge=0)`)."""
    assigned = {
        id(node.value): node.target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    return [
        (assigned.get(id(node)), kw.arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg in BOUND_KEYWORDS and isinstance(kw.value, (ast.Constant, ast.UnaryOp))
    ]


def test_no_literal_schema_bounds_outside_the_registry() -> None:
    offenders = []
    for rel, tree, _ in _sources():
        if rel.startswith("app/options/"):
            continue
        for field, kw in _literal_bound_fields(tree):
            if (rel, None) not in OWN_BOUNDS and (rel, field) not in OWN_BOUNDS:
                offenders.append((rel, field, kw))
    assert offenders == [], "bounds of options belong in app/options/registry.py"


def _error_texts(node: ast.Call) -> list[str]:
    """The literal text of an error call's arguments (f-strings' literal parts joined)."""
    texts = []
    for arg in node.args:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            texts.append(arg.value)
        elif isinstance(arg, ast.JoinedStr):
            texts.append(
                "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values)
            )
    return texts


def _callee(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def hand_written_ranges(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, option) of an `int_("<option>", value, <literal>, ...)` call, or of an error
    message that spells an option's range ("`top_p` must be in (0, 1]")."""
    ranged = {n: o.range for n, o in OPTIONS.items() if o.range is not None}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        first = node.args[0]
        name = first.value if isinstance(first, ast.Constant) else None
        if _callee(node) in ("int_", "_int") and name in ranged:
            found.append((node.lineno, name))
        if _callee(node) in ("ParamValidationError", "APIError", "ValueError"):
            for text in _error_texts(node):
                for option, bounds in ranged.items():
                    if f"`{option}` must be" in text and bounds.text in text:
                        found.append((node.lineno, option))
    return found


def test_no_hand_written_range_check_of_an_option() -> None:
    offenders = [
        (rel, *hit)
        for rel, tree, _ in _sources()
        if rel not in ("app/options/ranges.py", "app/options/registry.py")
        for hit in hand_written_ranges(tree)
    ]
    assert offenders == [], "check an option's range with option_range(name)"


def test_the_scans_find_a_duplicated_bound() -> None:
    tree = ast.parse(
        "top_k: int = Field(ge=0)\n"
        'x = int_("top_k", v, 0, ">= 0")\n'
        'raise ParamValidationError("top_p", f"`top_p` must be in (0, 1], got {x}")\n'
    )
    assert _literal_bound_fields(tree) == [("top_k", "ge")]
    assert sorted(hand_written_ranges(tree)) == [(2, "top_k"), (3, "top_p")]


# -- the routing ---------------------------------------------------------------------------
def test_split_options_by_class() -> None:
    engine_owned = {n: 1 for n, o in OPTIONS.items() if o.cls == "D"}
    split = split_options(
        {
            "top_k": 5,
            "tempurature": 1.0,  # unknown: passed on, resolve_sampling_params names it
            "prompt_lookup_num_tokens": 3,
            "max_matching_ngram_size": 2,
            "use_cache": False,
            "output_scores": True,
            "output_attentions": True,
            "output_hidden_states": False,
            "num_beam_groups": 1,  # class-B options are collected for resolve_class_b
            "encoder_repetition_penalty": 1.0,  # neutral values are as omitted
            "num_assistant_tokens": 20,
            "penalty_alpha": None,
            **engine_owned,
        }
    )
    assert split.engine == {
        "top_k": 5,
        "tempurature": 1.0,
        "prompt_lookup_num_tokens": 3,
        "max_matching_ngram_size": 2,
        "num_assistant_tokens": 20,  # neutral: no draft model needed
    }
    assert set(split.ignored) == {"use_cache", *engine_owned}
    assert split.exact == ["output_attentions"]
    assert split.class_b == {"num_beam_groups": 1}
    assert all(OPTIONS[n].status == IGNORED for n in split.ignored)


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"encoder_no_repeat_ngram_size": 2}, "encoder_no_repeat_ngram_size", "decoder-only"),
        ({"num_assistant_tokens": 5}, "num_assistant_tokens", "no draft model"),
        ({"use_mtp": True}, "use_mtp", "multi-token"),
    ],
)
def test_split_options_refusals_name_field_and_reason(
    options: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ParamValidationError) as err:
        split_options(options)
    assert err.value.field == field and field in str(err.value) and words in str(err.value)


def test_assisted_options_need_a_draft_model() -> None:
    assisted = {"num_assistant_tokens": 5, "num_assistant_tokens_schedule": "heuristic"}
    assert split_options(assisted, draft_model=True).engine == assisted
    with pytest.raises(ParamValidationError) as err:
        split_options(assisted)
    assert err.value.field == "num_assistant_tokens" and "--draft-model" in str(err.value)
    with pytest.raises(ParamValidationError) as err:  # lossy: refused even with a draft model
        split_options({"assistant_ensemble_weight": 0.5}, draft_model=True)
    assert "lossless" in str(err.value)


# -- the docs ------------------------------------------------------------------------------
def test_docs_options_md_is_generated() -> None:
    committed = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert committed == markdown(), (
        "docs/options.md is stale: python -m app.options.docs --markdown > docs/options.md"
    )


def test_api_md_documents_the_engine_owned_settings() -> None:
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name, opt in OPTIONS.items():
        if opt.cls == "D":
            assert f"`{name}`" in api, name
