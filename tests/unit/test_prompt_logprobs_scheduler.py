"""The scheduler's part of prompt log-probs, with plain ints: each chunk names the prompt
tokens its positions' logits score (chunked prefill: the next chunk's first token too), and a
request that asks skips the prefix-cache lookup while still caching its blocks."""

from __future__ import annotations

from tests.unit.sim_engine import SimEngine


def test_chunks_name_every_prompt_token_but_the_first_once() -> None:
    sim = SimEngine(num_blocks=32, block_size=4, max_num_batched_tokens=5)
    prompt = list(range(100, 112))
    request = sim.add("a", prompt, max_new=2)
    request.prompt_logprobs = 3
    targets: list[int] = []
    while True:
        (item,) = sim.step().seqs
        assert item.prompt_top_n == 3
        targets += item.prompt_targets
        if item.sample:  # the last chunk: up to the last prompt token
            break
        assert item.prompt_targets == prompt[item.start_pos + 1 : item.start_pos + 6]
    assert targets == prompt[1:]
    request.prompt_logprobs = None  # what the engine does once they are all in
    sim.run()
    assert sim.kv.num_free_blocks == 32


def test_asking_request_bypasses_the_prefix_cache() -> None:
    sim = SimEngine(num_blocks=32, block_size=4, max_num_batched_tokens=64)
    prompt = list(range(200, 213))
    sim.add("warm", prompt, max_new=1)
    sim.run()
    queries = sim.kv.prefix_queries
    asks = sim.add("asks", prompt, max_new=1)
    asks.prompt_logprobs = 0
    (item,) = sim.step().seqs
    assert item.start_pos == 0 and item.prompt_targets == prompt[1:]
    assert sim.kv.prefix_queries == queries and asks.num_cached_tokens == 0
    sim.run()
    sim.add("plain", prompt, max_new=1)
    (item,) = sim.step().seqs
    assert item.start_pos == 12 and item.prompt_targets == []  # 3 cached blocks: a hit
