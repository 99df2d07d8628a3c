"""Reference outputs of the class-B decoding methods as transformers 4.x implemented them.

Needs transformers 4.x (it was run with 4.46.3 and torch 2.13.0 CPU), NOT the project's
transformers 5: those methods left transformers' core in 5.0. Run from the repository root:

    python -m venv /tmp/tf4venv
    /tmp/tf4venv/bin/pip install torch==2.13.0 transformers==4.46.3
    /tmp/tf4venv/bin/python tests/data/class_b_reference.py > tests/data/class_b_reference.json

It runs `model.generate` on the embedded checkpoint (models/kogpt2-mini) in float64 for each
case and writes, per case, the prompt ids, the options (in the server's HTTP form: `constraints`
as {"type": "phrasal" | "disjunctive", ...} objects), the generated token ids of every returned
sequence (cut after the first eos, as the server reports them), the sequence scores of the beam
methods (not for group beam search: 4.x cannot record its scores in float64) and the
log-probability of each chosen token (token-by-token methods).
tests/unit/test_class_b_reference.py compares the server's implementation against this file.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import transformers
from transformers import (
    DisjunctiveConstraint,
    GPT2LMHeadModel,
    PhrasalConstraint,
    PreTrainedTokenizerFast,
)

MODEL = "models/kogpt2-mini"
PROMPTS = ["대한민국은 민주공화국이다", "모든 국민은", "국회는"]


def words(tokenizer: PreTrainedTokenizerFast, *texts: str) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def cases(tokenizer: PreTrainedTokenizerFast) -> list[dict[str, Any]]:
    phrase = words(tokenizer, " 국민의 권리")[0]
    either = words(tokenizer, " 자유", " 의무를")
    return [
        # contrastive search
        {"prompt": 0, "options": {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 16}},
        {"prompt": 1, "options": {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 16}},
        {
            "prompt": 2,
            "options": {
                "penalty_alpha": 0.3,
                "top_k": 6,
                "max_new_tokens": 16,
                "repetition_penalty": 1.2,
                "no_repeat_ngram_size": 3,
            },
        },
        {"prompt": 1, "options": {"penalty_alpha": 1.0, "top_k": 3, "max_new_tokens": 10}},
        {  # token 17 as eos: the model's sentences end with it
            "prompt": 0,
            "options": {"penalty_alpha": 0.5, "top_k": 5, "max_new_tokens": 30, "eos_token_id": 17},
        },
        # group (diverse) beam search
        {
            "prompt": 0,
            "options": {
                "num_beams": 4,
                "num_beam_groups": 2,
                "diversity_penalty": 1.0,
                "num_return_sequences": 4,
                "max_new_tokens": 10,
            },
        },
        {
            "prompt": 1,
            "options": {
                "num_beams": 6,
                "num_beam_groups": 3,
                "diversity_penalty": 0.5,
                "num_return_sequences": 3,
                "max_new_tokens": 12,
                "length_penalty": 0.8,
                "early_stopping": True,
            },
        },
        {
            "prompt": 2,
            "options": {
                "num_beams": 4,
                "num_beam_groups": 4,
                "diversity_penalty": 2.0,
                "num_return_sequences": 2,
                "max_new_tokens": 20,
                "repetition_penalty": 1.3,
            },
        },
        {
            "prompt": 1,
            "options": {
                "num_beams": 4,
                "num_beam_groups": 2,
                "diversity_penalty": 0.7,
                "num_return_sequences": 3,
                "max_new_tokens": 24,
                "eos_token_id": 17,
            },
        },
        # DoLa (the 4-layer model: "low" and "high" are both layer 2; lists reach the others)
        {"prompt": 0, "options": {"dola_layers": "low", "max_new_tokens": 16}},
        {
            "prompt": 1,
            "options": {"dola_layers": "high", "max_new_tokens": 16, "repetition_penalty": 1.2},
        },
        {
            "prompt": 2,
            "options": {"dola_layers": [0, 2], "max_new_tokens": 16, "repetition_penalty": 1.2},
        },
        {"prompt": 0, "options": {"dola_layers": [1, 3], "max_new_tokens": 12}},
        {
            "prompt": 1,
            "options": {
                "dola_layers": [0, 1],
                "do_sample": True,
                "top_k": 20,
                "max_new_tokens": 12,
                "repetition_penalty": 1.2,
                "seed": 1234,
            },
        },
        # constrained beam search
        {
            "prompt": 0,
            "options": {
                "force_words_ids": words(tokenizer, " 법률", " 대통령"),
                "num_beams": 4,
                "max_new_tokens": 14,
            },
        },
        {
            "prompt": 1,
            "options": {
                "force_words_ids": [phrase, either],
                "num_beams": 5,
                "num_return_sequences": 2,
                "max_new_tokens": 24,
            },
        },
        {
            "prompt": 0,
            "options": {
                "force_words_ids": words(tokenizer, " 국민"),
                "num_beams": 3,
                "num_return_sequences": 3,
                "max_new_tokens": 24,
                "eos_token_id": 17,
                "early_stopping": "never",
            },
        },
        {
            "prompt": 2,
            "options": {
                "constraints": [
                    {"type": "phrasal", "token_ids": phrase},
                    {"type": "disjunctive", "nested_token_ids": either},
                ],
                "num_beams": 4,
                "max_new_tokens": 16,
                "length_penalty": 0.5,
                "no_repeat_ngram_size": 2,
            },
        },
    ]


def to_constraint(spec: dict[str, Any]) -> Any:
    if spec["type"] == "phrasal":
        return PhrasalConstraint(spec["token_ids"])
    return DisjunctiveConstraint(spec["nested_token_ids"])


def cut_after_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def run_case(model: Any, prompt: list[int], options: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(options)
    seed = kwargs.pop("seed", 0)
    if "constraints" in kwargs:
        kwargs["constraints"] = [to_constraint(c) for c in kwargs["constraints"]]
    ids = torch.tensor([prompt])
    # 4.x's group beam search cannot record scores in float64 (a float32 buffer): tokens only.
    scores = "num_beam_groups" not in kwargs
    torch.manual_seed(seed)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        output_scores=scores,
        return_dict_in_generate=True,
        **kwargs,
    )
    eos = options.get("eos_token_id", model.generation_config.eos_token_id)
    rows = [cut_after_eos(r, eos) for r in out.sequences[:, len(prompt) :].tolist()]
    result: dict[str, Any] = {"sequences": rows}
    if getattr(out, "sequences_scores", None) is not None:
        result["sequence_scores"] = out.sequences_scores.tolist()
    elif scores and "num_beams" not in kwargs:
        result["logprobs"] = [
            float(torch.log_softmax(step[0].double(), dim=-1)[token])
            for step, token in zip(out.scores, rows[0], strict=False)
        ]
    return result


def main() -> None:
    torch.set_num_threads(1)
    model = GPT2LMHeadModel.from_pretrained(MODEL, torch_dtype=torch.float64).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{MODEL}/tokenizer.json")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    results = []
    for case in cases(tokenizer):
        prompt = prompts[case["prompt"]]
        results.append(
            {
                "prompt_ids": prompt,
                "options": case["options"],
                **run_case(model, prompt, case["options"]),
            }
        )
    meta = {"transformers": transformers.__version__, "torch": torch.__version__}
    lines = ",\n".join("  " + json.dumps(case, ensure_ascii=False) for case in results)
    sys.stdout.write(f'{{"generated_by": {json.dumps(meta)},\n "cases": [\n{lines}\n]}}\n')


if __name__ == "__main__":
    main()
