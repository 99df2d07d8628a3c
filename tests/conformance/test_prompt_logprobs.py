"""Prompt log-probs (SamplingParams.prompt_logprobs) equal log_softmax of GPT2LMHeadModel's
logits over the prompt: float64 to 1e-12, float32 to 1e-4; whole prefills, chunked prefills,
prefix-cache hits, slices of the LM head, prompt-only requests, and a batch where other
requests do not ask (their tokens unchanged)."""

from __future__ import annotations

import pytest
import torch

import app.engine.model_runner as model_runner
from app.engine.core.request import FinishReason
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.outputs import PromptLogprob, RequestOutput
from app.modeling.loader import DEFAULT_MODEL_DIR, LoadedModel, load_model
from app.options.params import SamplingParams
from tests.conformance.conftest import encode, hf_generate

TEXTS = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "국회는 국민의 보통·평등·직접·비밀선거에 의하여 선출된 국회의원으로 구성한다.",
    "법률",
]


@pytest.fixture(scope="module")
def embedded32() -> LoadedModel:
    return load_model(str(DEFAULT_MODEL_DIR), device="cpu", dtype="float32")


def reference(loaded: LoadedModel, prompt: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits: row p is the distribution of token p + 1."""
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits, dim=-1)


def make_engine(loaded: LoadedModel, **config: int | bool) -> LLMEngine:
    return LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            num_blocks=int(config.get("num_blocks", 256)),
            block_size=int(config.get("block_size", 4)),
            max_num_batched_tokens=int(config.get("max_num_batched_tokens", 2048)),
            enable_prefix_caching=bool(config.get("enable_prefix_caching", True)),
        ),
    )


def greedy(max_new_tokens: int, prompt_logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens, eos_token_id=None, prompt_logprobs=prompt_logprobs
    )


def run(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            outputs.setdefault(out.request_id, []).append(out)
    engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return outputs


def prompt_logprobs_of(outs: list[RequestOutput]) -> list[PromptLogprob | None]:
    """The request's prompt log-probs, checking they came once, on its first output."""
    carried = [out.prompt_logprobs for out in outs]
    assert carried[0] is not None
    assert all(p is None for p in carried[1:])
    return carried[0]


def check(
    loaded: LoadedModel, prompt: list[int], got: list[PromptLogprob | None], k: int, tol: float
) -> None:
    ref = reference(loaded, prompt)
    assert len(got) == len(prompt)
    assert got[0] is None
    for p in range(1, len(prompt)):
        entry = got[p]
        assert entry is not None
        row = ref[p - 1]
        expected = float(row[prompt[p]])
        assert entry.id == prompt[p]
        assert abs(entry.logprob - expected) <= tol, (p, entry.logprob, expected)
        assert entry.rank == int((row >= row[prompt[p]]).sum())
        values, ids = torch.topk(row, k)
        assert [i for i, _ in entry.top] == ids.tolist()
        for (_, got_value), want in zip(entry.top, values.tolist(), strict=True):
            assert abs(got_value - want) <= tol


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7])
def test_values_equal_transformers_in_float64(
    embedded64: LoadedModel, max_num_batched_tokens: int
) -> None:
    """Several prompts in one batch, whole or in chunks of 7 tokens (a chunk's last target is
    the next chunk's first token), beside a request that does not ask: its tokens are
    generate's."""
    engine = make_engine(embedded64, max_num_batched_tokens=max_num_batched_tokens)
    prompts = [encode(embedded64, t) for t in TEXTS]
    assert len(prompts[0]) > 3 * max_num_batched_tokens or max_num_batched_tokens > 100
    for i, (prompt, k) in enumerate(zip(prompts, [0, 5, 2], strict=True)):
        engine.add_request(f"p{i}", prompt, greedy(3, k))
    engine.add_request("plain", prompts[1], greedy(6))
    outputs = run(engine)
    for i, (prompt, k) in enumerate(zip(prompts, [0, 5, 2], strict=True)):
        check(embedded64, prompt, prompt_logprobs_of(outputs[f"p{i}"]), k, 1e-12)
        tokens = [t for out in outputs[f"p{i}"] for s in out.outputs for t in s.token_ids]
        assert tokens == hf_generate(embedded64, prompt, {"max_new_tokens": 3})[0]
    plain = outputs["plain"]
    assert all(out.prompt_logprobs is None for out in plain)
    tokens = [t for out in plain for s in out.outputs for t in s.token_ids]
    assert tokens == hf_generate(embedded64, prompts[1], {"max_new_tokens": 6})[0]


def test_values_in_float32(embedded32: LoadedModel) -> None:
    engine = make_engine(embedded32, max_num_batched_tokens=16)
    prompt = encode(embedded32, TEXTS[0])
    engine.add_request("a", prompt, greedy(1, 3))
    check(embedded32, prompt, prompt_logprobs_of(run(engine)["a"]), 3, 1e-4)


def test_lm_head_runs_in_bounded_slices(
    embedded64: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most PROMPT_LOGITS_MAX_ELEMENTS logits at once: with room for 3 rows, a 40-row
    prefill takes 14 slices and gives the same values."""
    vocab = int(embedded64.config.vocab_size)
    monkeypatch.setattr(model_runner, "PROMPT_LOGITS_MAX_ELEMENTS", 3 * vocab)
    engine = make_engine(embedded64)
    head_rows: list[int] = []
    head = engine.runner.model.head

    def counting_head(hidden: torch.Tensor) -> torch.Tensor:
        head_rows.append(hidden.shape[0])
        return head(hidden)

    monkeypatch.setattr(engine.runner.model, "head", counting_head)
    prompt = encode(embedded64, TEXTS[0])
    engine.add_request("a", prompt, greedy(1, 4))
    check(embedded64, prompt, prompt_logprobs_of(run(engine)["a"]), 4, 1e-12)
    assert max(head_rows) <= 3
    assert sum(head_rows) >= len(prompt) - 1


def test_prefix_cache_hit_is_bypassed(embedded64: LoadedModel) -> None:
    """A cached prefix has KV but no logits: a request asking for prompt log-probs computes
    its whole prompt (no lookup, still correct), and its blocks are cached for the next."""
    engine = make_engine(embedded64, block_size=4)
    prompt = encode(embedded64, TEXTS[0])
    engine.add_request("warm", prompt, greedy(1))
    run(engine)
    hits = engine.kv.prefix_hits
    assert hits == 0
    longer = [*prompt, 5, 6]
    engine.add_request("asks", longer, greedy(1, 2))
    out = run(engine)["asks"]
    assert engine.kv.prefix_hits == hits  # not looked up
    assert out[0].num_cached_tokens == 0
    check(embedded64, longer, prompt_logprobs_of(out), 2, 1e-12)
    engine.add_request("after", longer, greedy(1))
    after = run(engine)["after"]
    assert after[0].num_cached_tokens == (len(prompt) + 1) // 4 * 4  # hits the inserted blocks


def test_prompt_only_request(embedded64: LoadedModel) -> None:
    """max_new_tokens 0 (OpenAI echo with max_tokens 0): the prefill, nothing sampled."""
    engine = make_engine(embedded64, max_num_batched_tokens=5)
    prompt = encode(embedded64, TEXTS[1])
    engine.add_request("a", prompt, greedy(0, 1))
    engine.add_request("one", prompt[:1], greedy(0, 1))
    outputs = run(engine)
    (out,) = outputs["a"]
    assert out.finished
    assert [(s.token_ids, s.finish_reason) for s in out.outputs] == [([], FinishReason.LENGTH)]
    check(embedded64, prompt, prompt_logprobs_of(outputs["a"]), 1, 1e-12)
    assert prompt_logprobs_of(outputs["one"]) == [None]


def test_beams_and_siblings_get_the_prompt_once(embedded64: LoadedModel) -> None:
    engine = make_engine(embedded64)
    prompt = encode(embedded64, TEXTS[1])
    lengths = {"max_new_tokens": 4, "max_length": len(prompt) + 4}  # generate's, resolved
    beams = SamplingParams(num_beams=3, prompt_logprobs=0, **lengths)
    engine.add_request("beams", prompt, beams)
    siblings = SamplingParams(
        do_sample=True, seed=1, num_return_sequences=3, prompt_logprobs=1, **lengths
    )
    engine.add_request("n", prompt, siblings)
    outputs = run(engine)
    check(embedded64, prompt, prompt_logprobs_of(outputs["beams"]), 0, 1e-12)
    check(embedded64, prompt, prompt_logprobs_of(outputs["n"]), 1, 1e-12)


def test_preempted_request_keeps_its_prompt_logprobs(embedded64: LoadedModel) -> None:
    """A pool too small for two requests: the newer is preempted (recompute) and still
    reports every prompt position once, with the same values."""
    prompt = encode(embedded64, TEXTS[0])
    blocks = -(-(len(prompt) + 12) // 4)
    engine = make_engine(embedded64, num_blocks=blocks + 2, max_num_batched_tokens=8)
    engine.add_request("a", prompt, greedy(12, 1))
    engine.add_request("b", prompt[:9], greedy(12, 1))
    outputs = run(engine)
    assert engine.scheduler.num_preemptions > 0
    check(embedded64, prompt, prompt_logprobs_of(outputs["a"]), 1, 1e-12)
    check(embedded64, prompt[:9], prompt_logprobs_of(outputs["b"]), 1, 1e-12)


def test_exclusive_lane_request(embedded64: LoadedModel) -> None:
    """The exact lane (output_hidden_states) runs transformers' generate: its prompt
    log-probs come from one forward of the model, on its first output."""
    engine = make_engine(embedded64)
    prompt = encode(embedded64, TEXTS[1])
    params = SamplingParams(
        max_new_tokens=2, max_length=len(prompt) + 2, eos_token_id=None, prompt_logprobs=2
    )
    engine.add_request("exact", prompt, params, diagnostics=("output_hidden_states",))
    outputs = run(engine)
    check(embedded64, prompt, prompt_logprobs_of(outputs["exact"]), 2, 1e-12)
