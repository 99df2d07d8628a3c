"""SamplingParams.logprobs=False: the same tokens, no log-prob computed or reported."""

from __future__ import annotations

import math

import torch

from app.engine.sample.row import SamplingRow
from app.engine.sample.sampler import Sampler
from app.options.resolve import resolve_sampling_params
from tests.unit.test_engine import make_engine


def test_sampler_skips_only_the_rows_that_do_not_want_them() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g, dtype=torch.float64)
    rows = [
        SamplingRow([1, 2], logprob=False),  # greedy, off
        SamplingRow([1, 2]),  # greedy, on
        SamplingRow([1], do_sample=True, top_k=0, generator=torch.Generator().manual_seed(1),
                    logprob=False),  # full-row sampling, off
        SamplingRow([1], do_sample=True, top_k=0, generator=torch.Generator().manual_seed(1)),
    ]  # fmt: skip
    out = Sampler(torch.Generator().manual_seed(0)).sample(logits, rows)
    want = torch.log_softmax(logits.float(), dim=-1)
    assert math.isnan(out.processed_logprobs[0]) and math.isnan(out.processed_logprobs[2])
    assert out.processed_logprobs[1] == want[1, out.token_ids[1]].item()
    assert out.processed_logprobs[3] == want[3, out.token_ids[3]].item()
    # The same draws as with log-probs on: rows 0/1 and 2/3 differ only in the flag.
    again = Sampler(torch.Generator().manual_seed(0)).sample(
        logits, [SamplingRow([1, 2]), rows[1], SamplingRow([1], do_sample=True, top_k=0,
                 generator=torch.Generator().manual_seed(1)), rows[3]]
    )  # fmt: skip
    assert out.token_ids[0] == again.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[2] == again.token_ids[2]


def test_engine_reports_none_and_draws_the_same(tiny_model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompts = [tiny_tokenizer(p)["input_ids"] for p in ("대한민국은", "모든 국민은")]
    got, logprobs = {}, {}
    for flag in (True, False):
        engine = make_engine(tiny_model, tiny_tokenizer)
        n_pos = engine.runner.config.n_positions
        for i, prompt in enumerate(prompts):
            opts = {"max_new_tokens": 5, "do_sample": bool(i), "seed": 7}
            params = resolve_sampling_params(opts, {}, n_pos, len(prompt))
            params.logprobs = flag
            engine.add_request(f"r{i}", prompt, params)
        tokens: dict[str, list[int]] = {"r0": [], "r1": []}
        lps: list[float] = []
        while engine.has_unfinished():
            for out in engine.step():
                for seq in out.outputs:
                    tokens[out.request_id] += seq.token_ids
                    lps += seq.logprobs
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        got[flag], logprobs[flag] = tokens, lps
    assert got[True] == got[False] and all(len(t) == 5 for t in got[True].values())
    assert len(logprobs[True]) == 10 and logprobs[False] == []
