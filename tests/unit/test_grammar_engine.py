"""Constrained decoding in the batched engine (tiny float64 GPT-2, Korean byte-level BPE).

The reference is transformers' own `generate(prefix_allowed_tokens_fn=...)`: for
allowed_token_ids the fixed list, for a grammar the tokens an llguidance matcher allows after
the row's generated tokens (a fresh matcher per call, so the reference keeps no state). A
grammar that completes ends the engine's sequence at once, where generate still spends one
step on the eos token it then forces; that trailing eos is the only difference allowed.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

from app.engine.core.request import FinishReason
from app.engine.engine import LLMEngine
from app.engine.grammar import ConstraintFactory, token_masks
from app.options.params import SamplingParams
from app.options.resolve import resolve_sampling_params
from tests.unit.test_engine import PROMPTS, make_engine

EOS, PAD = 1, 3
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "이름": {"type": "string", "maxLength": 6},
        "나이": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["이름", "나이"],
    "additionalProperties": False,
}
DIGITS = r"[0-9]{1,3}(,[0-9]{1,3}){0,3}"
JSON_GRAMMAR = {"type": "json", "value": SCHEMA}
REGEX_GRAMMAR = {"type": "regex", "value": DIGITS}
CASES: list[dict[str, Any]] = [
    {"grammar": JSON_GRAMMAR},
    {"grammar": JSON_GRAMMAR, "do_sample": True, "seed": 5},
    {"grammar": REGEX_GRAMMAR, "do_sample": True, "top_k": 0, "temperature": 1.3, "seed": 2},
    {"grammar": JSON_GRAMMAR, "do_sample": True, "num_return_sequences": 3, "seed": 8},
    {"allowed_token_ids": [EOS, 40, 41, 42, 300], "do_sample": True, "seed": 4},
    {"allowed_token_ids": [50, 51, 52], "repetition_penalty": 1.5},
]


def resolve(options: dict[str, Any], prompt: list[int], vocab: int) -> SamplingParams:
    config = {"eos_token_id": EOS, "pad_token_id": PAD}
    return resolve_sampling_params(options, config, 128, len(prompt), vocab_size=vocab)


def reference(
    model: Any, tokenizer: Any, prompt: list[int], options: dict[str, Any]
) -> list[list[int]]:
    """generate() with prefix_allowed_tokens_fn; per returned row, its tokens without pads."""
    params = resolve(options, prompt, len(tokenizer))
    factory = ConstraintFactory(tokenizer, model.config.vocab_size, num_threads=1)
    vocab = model.config.vocab_size

    def allowed(_batch: int, ids: torch.Tensor) -> list[int]:
        generated = ids[len(prompt) :].tolist()
        if EOS in generated:  # a finished row: generate pads it whatever is allowed
            return list(range(vocab))
        fresh = factory.make(params)
        assert fresh is not None
        for token in generated:
            fresh.advance(token, None)
        return np.flatnonzero(token_masks([fresh], vocab)[0]).tolist()

    kwargs = {k: v for k, v in options.items() if k not in ("grammar", "allowed_token_ids")}
    torch.manual_seed(kwargs.pop("seed", 0))
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        prefix_allowed_tokens_fn=allowed,
        eos_token_id=EOS,
        pad_token_id=PAD,
        **kwargs,
    )
    rows = []
    for row in out[:, len(prompt) :].tolist():
        end = row.index(EOS) + 1 if EOS in row else len(row)
        rows.append(row[:end])
    return rows


def run(
    engine: LLMEngine, jobs: list[tuple[list[int], dict[str, Any]]]
) -> dict[str, dict[int, tuple[list[int], FinishReason | None]]]:
    vocab = engine.runner.config.vocab_size
    for i, (prompt, options) in enumerate(jobs):
        engine.add_request(f"r{i}", prompt, resolve(options, prompt, vocab))
    got: dict[str, dict[int, tuple[list[int], FinishReason | None]]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for seq in out.outputs:
                ids, _ = got.setdefault(out.request_id, {}).get(seq.index, ([], None))
                got[out.request_id][seq.index] = (ids + seq.token_ids, seq.finish_reason)
        engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return got


def matches(ours: list[int], reason: FinishReason | None, ref: list[int]) -> bool:
    """Equal, or the grammar completed here and generate then forced its eos."""
    return ours == ref or (reason is FinishReason.EOS and ref == [*ours, EOS])


def check_text(tokenizer: Any, options: dict[str, Any], ids: list[int], reason: Any) -> None:
    """A sequence that ended by eos is a complete, valid output of its grammar."""
    grammar = options.get("grammar")
    if grammar is None or reason is not FinishReason.EOS:
        return
    text = tokenizer.decode([t for t in ids if t != EOS], skip_special_tokens=True)
    if grammar["type"] == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    else:
        assert re.fullmatch(DIGITS, text), text


@pytest.mark.parametrize("options", CASES)
def test_constrained_request_alone_and_in_a_busy_batch(
    tiny_model: Any, tiny_tokenizer: Any, one_thread: None, options: dict[str, Any]
) -> None:
    options = {**options, "max_new_tokens": 60}
    prompt = tiny_tokenizer(PROMPTS[0])["input_ids"]
    ref = reference(tiny_model, tiny_tokenizer, prompt, options)
    plain = {"max_new_tokens": 12, "do_sample": True, "seed": 3}
    others = [(tiny_tokenizer(p)["input_ids"], plain) for p in PROMPTS[1:]]
    alone = run(make_engine(tiny_model, tiny_tokenizer), others)
    busy = run(make_engine(tiny_model, tiny_tokenizer), [(prompt, options), *others])
    seqs = busy.pop("r0")
    assert len(seqs) == len(ref)
    for index, (ids, reason) in seqs.items():
        assert matches(ids, reason, ref[index]), (index, ids, ref[index])
        check_text(tiny_tokenizer, options, ids, reason)
    # the unconstrained requests in the same batches produce what they produce alone
    assert {f"r{int(k[1:]) - 1}": v for k, v in busy.items()} == alone


def test_grammar_survives_recompute_preemption(tiny_model: Any, tiny_tokenizer: Any) -> None:
    long_korean = {"type": "regex", "value": "[가-힣 ]{30,60}"}  # still open at 40 tokens
    jobs = [
        (tiny_tokenizer(p)["input_ids"], {"grammar": long_korean, "do_sample": True, "seed": i})
        for i, p in enumerate(PROMPTS[:3])
    ]
    jobs = [(p, {**o, "max_new_tokens": 40}) for p, o in [*jobs, (jobs[0][0], CASES[3])]]
    roomy = run(make_engine(tiny_model, tiny_tokenizer), jobs)
    tight_engine = make_engine(
        tiny_model, tiny_tokenizer, num_blocks=48, enable_prefix_caching=False
    )
    tight = run(tight_engine, jobs)
    assert tight_engine.scheduler.num_preemptions > 0
    assert tight == roomy
    for (_prompt, options), seqs in zip(jobs, tight.values(), strict=True):
        for ids, reason in seqs.values():
            check_text(tiny_tokenizer, options, ids, reason)


def test_prompt_lookup_keeps_constrained_output(tiny_model: Any, tiny_tokenizer: Any) -> None:
    """Drafts are verified token by token through the same sampler and matcher."""
    prompt = tiny_tokenizer(PROMPTS[2])["input_ids"]  # repetitive: the lookup finds drafts
    for options in CASES[:3]:
        options = {**options, "max_new_tokens": 40}
        plain = run(make_engine(tiny_model, tiny_tokenizer), [(prompt, options)])
        engine = make_engine(tiny_model, tiny_tokenizer)
        drafted = run(engine, [(prompt, {**options, "prompt_lookup_num_tokens": 3})])
        assert drafted == plain
        assert engine.stats()["spec_draft_tokens"] > 0


def test_no_token_left_fails_only_that_request(tiny_model: Any, tiny_tokenizer: Any) -> None:
    engine = make_engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer(PROMPTS[1])["input_ids"]
    vocab = tiny_model.config.vocab_size
    clash = resolve({"allowed_token_ids": [40], "bad_words_ids": [[40]]}, prompt, vocab)
    engine.add_request("bad", prompt, clash)
    engine.add_request("good", prompt, resolve({"max_new_tokens": 4}, prompt, vocab))
    errors: dict[str, str | None] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                errors[out.request_id] = out.error
    assert errors["good"] is None
    assert errors["bad"] is not None and "no token is left" in errors["bad"]
