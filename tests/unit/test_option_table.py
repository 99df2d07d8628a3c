"""The option table (app/api/option_table.py) classifies every generate option, stays in step
with transformers, the HTTP schemas, the engine and the tests it names, and drives
split_options; docs/options.md is its generated markdown."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from transformers import GenerationConfig

from app.api.option_routing import split_options
from app.api.option_table import (
    CLASSES,
    GENERATION_CONFIG_CLASSES,
    IGNORED,
    NOT_YET,
    OPTION_TABLE,
    REJECTED,
    SERVED,
    STATUSES,
    markdown,
)
from app.api.options import OPTION_NAMES
from app.api.protocol.tgi import GenerateParameters, GenerateRequest
from app.engine.sampling_params import (
    ACCEPTED_OPTIONS,
    ParamValidationError,
    resolve_sampling_params,
)

ROOT = Path(__file__).resolve().parents[2]
GENERATION_CONFIG_FIELDS = {
    k for k in GenerationConfig().to_dict() if not k.startswith("_") and k != "transformers_version"
}
HTTP_FIELDS = set(GenerateParameters.model_fields) | {"input_ids"}
CHECKPOINT = {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 3}


def test_every_generation_config_field_is_classified() -> None:
    missing = GENERATION_CONFIG_FIELDS - set(OPTION_TABLE)
    assert not missing, f"GenerationConfig fields the option table does not classify: {missing}"


def test_table_lists_no_field_generation_config_lacks() -> None:
    for name, spec in OPTION_TABLE.items():
        in_config = name in GENERATION_CONFIG_FIELDS
        assert in_config == (spec.cls in GENERATION_CONFIG_CLASSES), (name, spec.cls)


def test_table_matches_the_http_fields() -> None:
    assert set(OPTION_NAMES) <= set(OPTION_TABLE), set(OPTION_NAMES) - set(OPTION_TABLE)
    assert set(OPTION_TABLE) <= HTTP_FIELDS, set(OPTION_TABLE) - HTTP_FIELDS
    assert "input_ids" in GenerateRequest.model_fields


def test_entries_are_well_formed() -> None:
    for name, spec in OPTION_TABLE.items():
        assert spec.cls in CLASSES and spec.status in STATUSES, name
        assert spec.type and spec.range and spec.default and spec.tests, name
        if spec.status == SERVED:
            assert spec.via in ("engine", "api", "exact-lane", "class-b"), name
        else:
            assert spec.via == "-", name
        if spec.status in (REJECTED, NOT_YET):
            assert spec.note, f"{name}: a refusal needs its reason"


def test_neutral_values_include_transformers_defaults() -> None:
    hf = GenerationConfig._get_default_generation_params()
    for name, spec in OPTION_TABLE.items():
        if spec.status in (REJECTED, NOT_YET) and spec.cls in GENERATION_CONFIG_CLASSES:
            default = hf.get(name)
            assert default is None or default in spec.neutral, (name, default)
            assert spec.default == ("null" if default is None else repr(default)), name


def test_listed_tests_exist() -> None:
    for name, spec in OPTION_TABLE.items():
        for node in spec.tests:
            path, _, function = node.partition("::")
            assert (ROOT / path).is_file(), (name, node)
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert callable(getattr(module, function, None)), (name, node)


def engine_served() -> list[str]:
    return [n for n, s in OPTION_TABLE.items() if s.status == SERVED and s.via == "engine"]


@pytest.mark.parametrize("name", engine_served())
def test_engine_served_options_are_accepted_by_resolve(name: str) -> None:
    spec = OPTION_TABLE[name]
    assert spec.example is not None and name in spec.example, name
    assert name in ACCEPTED_OPTIONS, name
    params = resolve_sampling_params(
        {"max_new_tokens": 8, **spec.example},
        CHECKPOINT,
        1024,
        4,
        encode=lambda text: [5, 6],
        vocab_size=1000,
    )
    if name in ("seed", "temperature", "top_k", "top_p", "num_beams", "min_length"):
        assert getattr(params, name) == spec.example[name]


def test_options_the_engine_does_not_serve_are_not_marked_served() -> None:
    """Fails when the engine starts serving an option the table still refuses or drops:
    then the table (and docs/options.md) must be updated."""
    for name, spec in OPTION_TABLE.items():
        if spec.status != SERVED:
            assert name not in ACCEPTED_OPTIONS, f"the engine serves `{name}` now: update the table"


def test_split_options_by_class() -> None:
    engine_owned = {n: 1 for n, s in OPTION_TABLE.items() if s.cls == "D"}
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
            "num_beam_groups": 1,  # neutral values are as omitted
            "encoder_repetition_penalty": 1.0,
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
    assert all(OPTION_TABLE[n].status == IGNORED for n in split.ignored)


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"encoder_no_repeat_ngram_size": 2}, "encoder_no_repeat_ngram_size", "decoder-only"),
        ({"num_assistant_tokens": 5}, "num_assistant_tokens", "no draft model"),
        ({"use_mtp": True}, "use_mtp", "multi-token"),
        ({"adapter_id": "x"}, "adapter_id", "adapters"),
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


def test_docs_options_md_is_generated() -> None:
    committed = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert committed == markdown(), (
        "docs/options.md is stale: python -m app.api.option_table --markdown > docs/options.md"
    )


def test_api_md_documents_the_engine_owned_settings() -> None:
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name, spec in OPTION_TABLE.items():
        if spec.cls == "D":
            assert f"`{name}`" in api, name
