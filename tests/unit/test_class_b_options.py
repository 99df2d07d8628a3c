"""Class-B option validation (no torch): transformers 4.x's rules, 422s naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from app.options.checks import ParamValidationError
from app.options.class_b import (
    CONSTRAINED,
    CONTRASTIVE,
    DOLA,
    GROUP_BEAM,
    ClassBParams,
    MethodLimits,
    resolve_class_b,
)
from app.options.params import SamplingParams

VOCAB, LAYERS = 100, 4
WORDS = {"국민": [7, 8], "법": [9], "자유": [10]}


def resolve(options: dict[str, Any], **params: Any) -> SamplingParams:
    return resolve_class_b(
        options,
        SamplingParams(**params),
        num_layers=LAYERS,
        vocab_size=VOCAB,
        encode=lambda text: WORDS.get(text, []),
    )


@pytest.mark.parametrize(
    ("options", "params", "method"),
    [
        ({"penalty_alpha": 0.6}, {"top_k": 4}, CONTRASTIVE),
        ({"penalty_alpha": 1}, {}, CONTRASTIVE),  # ints are accepted for floats
        ({"num_beam_groups": 2, "diversity_penalty": 0.5}, {"num_beams": 4}, GROUP_BEAM),
        ({"dola_layers": "low"}, {}, DOLA),
        ({"dola_layers": [0, 3]}, {"do_sample": True}, DOLA),
        ({"force_words_ids": [[5], [[6], [7, 8]]]}, {"num_beams": 2}, CONSTRAINED),
        (
            {"constraints": [{"type": "phrasal", "token_ids": [5, 6]}]},
            {"num_beams": 2},
            CONSTRAINED,
        ),
    ],
)
def test_each_method_is_recognised(
    options: dict[str, Any], params: dict[str, Any], method: str
) -> None:
    resolved = resolve(options, **params)
    assert isinstance(resolved, ClassBParams) and resolved.class_b is not None
    assert resolved.class_b.method == method
    assert all(getattr(resolved, k) == v for k, v in params.items())  # the rest is kept


def test_neutral_values_are_as_omitted() -> None:
    plain = SamplingParams(num_beams=3)
    neutral = {
        "penalty_alpha": 0.0,
        "num_beam_groups": 1,
        "diversity_penalty": 0,
        "dola_layers": None,
    }
    assert resolve_class_b(neutral, plain, num_layers=LAYERS) is plain
    assert resolve_class_b({"constraints": []}, plain, num_layers=LAYERS) is plain


@pytest.mark.parametrize(
    ("options", "params", "field", "words"),
    [
        ({"penalty_alpha": 1.5}, {}, "penalty_alpha", "[0, 1]"),
        ({"penalty_alpha": -0.1}, {}, "penalty_alpha", "[0, 1]"),
        ({"penalty_alpha": "x"}, {}, "penalty_alpha", "finite"),
        ({"penalty_alpha": 0.5}, {"top_k": 1}, "top_k", "[2, 100]"),
        ({"penalty_alpha": 0.5}, {"top_k": 101}, "top_k", "[2, 100]"),
        ({"penalty_alpha": 0.5}, {"do_sample": True}, "penalty_alpha", "do_sample=false"),
        ({"penalty_alpha": 0.5}, {"num_beams": 2}, "penalty_alpha", "num_beams = 1"),
        (
            {"num_beam_groups": 3, "diversity_penalty": 1.0},
            {"num_beams": 4},
            "num_beam_groups",
            "divide",
        ),
        ({"num_beam_groups": 2, "diversity_penalty": 1.0}, {}, "num_beam_groups", "num_beams > 1"),
        ({"num_beam_groups": 0}, {"num_beams": 4}, "num_beam_groups", ">= 1"),
        ({"num_beam_groups": 2}, {"num_beams": 4}, "diversity_penalty", "> 0"),
        (
            {"num_beam_groups": 2, "diversity_penalty": -1.0},
            {"num_beams": 4},
            "diversity_penalty",
            "> 0",
        ),
        ({"diversity_penalty": 0.5}, {"num_beams": 4}, "diversity_penalty", "num_beam_groups > 1"),
        (
            {"num_beam_groups": 2, "diversity_penalty": 1.0},
            {"num_beams": 4, "do_sample": True},
            "do_sample",
            "do_sample=false",
        ),
        ({"dola_layers": "middle"}, {}, "dola_layers", "[0, 4)"),
        ({"dola_layers": [4]}, {}, "dola_layers", "[0, 4)"),
        ({"dola_layers": []}, {}, "dola_layers", "non-empty"),
        ({"dola_layers": "high"}, {"num_beams": 2}, "dola_layers", "num_beams = 1"),
        (
            {"dola_layers": "high"},
            {"do_sample": True, "num_return_sequences": 2},
            "num_return_sequences",
            "one sequence",
        ),
        ({"force_words_ids": [[5]]}, {}, "force_words_ids", "num_beams > 1"),
        ({"force_words_ids": [[5]]}, {"num_beams": 2, "do_sample": True}, "do_sample", "false"),
        ({"force_words_ids": []}, {"num_beams": 2}, "force_words_ids", "non-empty"),
        ({"force_words_ids": [5]}, {"num_beams": 2}, "force_words_ids", "list of token ids"),
        ({"force_words_ids": [[5, -1]]}, {"num_beams": 2}, "force_words_ids", ">= 0"),
        ({"force_words_ids": [[100]]}, {"num_beams": 2}, "force_words_ids", "< 100"),
        ({"force_words_ids": [[[5], [5, 6]]]}, {"num_beams": 2}, "force_words_ids", "prefix"),
        ({"constraints": [[5]]}, {"num_beams": 2}, "constraints", '"phrasal"'),
        (
            {"constraints": [{"type": "phrasal", "ids": [5]}]},
            {"num_beams": 2},
            "constraints",
            "token_ids",
        ),
        ({"force_words": ["없는말"]}, {"num_beams": 2}, "force_words", "non-empty string"),
        ({"force_words": "국민"}, {"num_beams": 2}, "force_words", "non-empty list"),
        ({"penalty_alpha": 0.5, "dola_layers": "low"}, {}, "dola_layers", "different decoding"),
        (
            {"num_beam_groups": 2, "diversity_penalty": 1.0, "force_words": ["법"]},
            {"num_beams": 2},
            "force_words",
            "different decoding",
        ),
    ],
)
def test_invalid_values_name_field_and_range(
    options: dict[str, Any], params: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ParamValidationError) as err:
        resolve(options, **params)
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_force_words_strings_are_tokenized() -> None:
    resolved = resolve(
        {"force_words_ids": [[5]], "force_words": ["국민", ["법", "자유"]]}, num_beams=2
    )
    assert isinstance(resolved, ClassBParams) and resolved.class_b is not None
    assert list(resolved.class_b.constraints) == [
        {"type": "phrasal", "token_ids": [5]},
        {"type": "phrasal", "token_ids": [7, 8]},
        {"type": "disjunctive", "nested_token_ids": [[9], [10]]},
    ]
    both = resolve(
        {"constraints": [{"type": "phrasal", "token_ids": [3]}], "force_words_ids": [[4]]},
        num_beams=2,
    )
    assert isinstance(both, ClassBParams) and both.class_b is not None
    assert [c["token_ids"] for c in both.class_b.constraints] == [[3], [4]]  # 4.x's order


def test_token_constraints_of_the_engine_are_refused() -> None:
    base = SamplingParams()
    if not hasattr(base, "allowed_token_ids"):
        pytest.skip("this SamplingParams has no allowed_token_ids")
    base.allowed_token_ids = [5, 6]
    with pytest.raises(ParamValidationError) as err:
        resolve_class_b({"penalty_alpha": 0.5}, base, num_layers=LAYERS)
    assert err.value.field == "allowed_token_ids"


def priced(options: dict[str, Any], prompt_len: int, limits: MethodLimits, **params: Any) -> Any:
    return resolve_class_b(
        options,
        SamplingParams(**params),
        num_layers=LAYERS,
        vocab_size=VOCAB,
        prompt_len=prompt_len,
        limits=limits,
    )


def test_contrastive_work_is_top_k_times_positions() -> None:
    """Every step copies the KV cache per candidate: top_k x (prompt + new tokens)."""
    limits = MethodLimits(contrastive_work=8 * 40)
    fits = priced({"penalty_alpha": 0.5}, 30, limits, top_k=8, max_new_tokens=10)
    assert isinstance(fits, ClassBParams)
    with pytest.raises(ParamValidationError) as err:
        priced({"penalty_alpha": 0.5}, 31, limits, top_k=8, max_new_tokens=10)
    assert err.value.field == "top_k" and "--max-contrastive-work" in str(err.value)
    assert "328" in str(err.value) and "320" in str(err.value)


def test_dola_work_is_layers_times_vocab() -> None:
    """The contrast stacks a vocabulary row per listed layer, repeats included."""
    limits = MethodLimits(dola_work=3 * VOCAB)
    assert isinstance(priced({"dola_layers": [1, 1, 2]}, 5, limits), ClassBParams)
    assert isinstance(priced({"dola_layers": "low"}, 5, limits), ClassBParams)
    with pytest.raises(ParamValidationError) as err:
        priced({"dola_layers": [1, 1, 2, 3]}, 5, limits)
    assert err.value.field == "dola_layers" and "--max-dola-work" in str(err.value)
    assert "4 premature layers" in str(err.value)


def test_no_limits_no_pricing() -> None:
    big = priced({"dola_layers": [1] * 1000}, 5, MethodLimits())
    assert isinstance(big, ClassBParams)
