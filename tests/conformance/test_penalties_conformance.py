"""Conformance for OpenAI's presence / frequency penalties on the embedded model in float64:
transformers has no such processor, so the reference is tests/unit/test_penalties.py's plain
loop over GPT2LMHeadModel (generate's `_sample` written out: float32 scores, HF's repetition
penalty, vLLM's penalty formula, HF's no-repeat-ngram and warpers, multinomial after
torch.manual_seed). The engine must give its tokens alone, in a busy batch and with
prompt-lookup drafts."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.conftest import encode, engine_generate
from tests.unit.test_penalties import PENALTIES, reference

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["대한민국은", "국회는 국민의", "제1조 대한민국은 민주공화국이다. 모든 권력은", "법률"]
# The embedded model recites its (legal) training text with wide logit margins; on a prompt
# outside it the penalties change what is chosen (checked below for every case).
PROMPT = "오늘 날씨가"
BASE = {"max_new_tokens": 24, "ignore_eos": True}
CASES: list[dict[str, Any]] = [
    {"frequency_penalty": 2.0, "presence_penalty": 2.0},
    {"frequency_penalty": -2.0, "presence_penalty": -1.0, "repetition_penalty": 1.3},
    {"do_sample": True, "seed": 42, "frequency_penalty": 1.5, "top_p": 0.92, "temperature": 1.5},
    {
        "do_sample": True,
        "seed": 3,
        "num_return_sequences": 3,
        "frequency_penalty": -2.0,
        "temperature": 1.5,
    },
    {"frequency_penalty": -2.0, "no_repeat_ngram_size": 3, "prompt_lookup_num_tokens": 3},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(o))
def test_penalties_equal_the_reference_loop(embedded64: Any, options: dict[str, Any]) -> None:
    options = {**BASE, **options}
    prompt = encode(embedded64, PROMPT)
    ref = reference(embedded64.model, prompt, options)
    plain = {k: v for k, v in options.items() if k not in PENALTIES}
    assert ref != reference(embedded64.model, prompt, plain), "the penalty changes nothing here"
    busy = [
        (encode(embedded64, p), {"max_new_tokens": 16, "do_sample": True, "seed": i, "top_k": 20})
        for i, p in enumerate(PROMPTS)
    ]
    alone = engine_generate(embedded64, [(prompt, options)])[0]
    assert [alone[i] for i in sorted(alone)] == ref, f"alone: {options}"
    mixed = engine_generate(embedded64, [busy[0], busy[1], (prompt, options), *busy[2:]])[2]
    assert [mixed[i] for i in sorted(mixed)] == ref, f"in a busy batch: {options}"
