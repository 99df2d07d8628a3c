"""Speculative decoding in the scheduler and KV manager, with plain ints (no torch):
drafts take budget and blocks, only accepted drafts count as computed, blocks holding only
rejected drafts go back to the pool, the prefix cache never hashes a rejected token, and the
output equals plain decoding's."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.engine.core.kv_cache_manager import KVCacheManager
from tests.unit.spec_sim import SpecSimEngine, draft_for
from tests.unit.test_scheduler import reference_outputs


def test_drafts_are_scheduled_after_the_last_token_and_use_budget() -> None:
    sim = SpecSimEngine(num_blocks=32, block_size=4, max_num_batched_tokens=64, num_drafts=0)
    request = sim.add("a", list(range(6)), max_new=10)
    sim.step()  # prefill + first token
    seq = request.seqs[0]
    seq.spec_token_ids = draft_for(seq.token_ids, 3, good=3)
    out = sim.step()
    (item,) = out.seqs
    assert item.draft_token_ids == seq.token_ids[7:10] and item.all_logits
    assert item.token_ids[0] == seq.token_ids[6] and item.start_pos == 6
    assert out.num_batched_tokens == 4
    # all three drafts were right: 3 accepted + 1 chosen after them
    assert seq.num_computed_tokens == 10 and len(seq.token_ids) == 11
    assert sim.accepted == 3 and sim.drafted == 3


def test_drafts_are_cut_to_the_token_budget() -> None:
    sim = SpecSimEngine(num_blocks=32, block_size=4, max_num_batched_tokens=3, num_drafts=0)
    request = sim.add("a", [1, 2], max_new=10)
    sim.step()
    seq = request.seqs[0]
    seq.spec_token_ids = draft_for(seq.token_ids, 5, good=5)
    out = sim.step()
    assert len(out.seqs[0].draft_token_ids) == 2 and out.num_batched_tokens == 3


def test_rejected_drafts_free_their_blocks_and_keep_num_computed() -> None:
    sim = SpecSimEngine(num_blocks=32, block_size=4, max_num_batched_tokens=64, num_drafts=0)
    request = sim.add("a", [1, 2, 3], max_new=20)
    sim.step()  # 3 prompt tokens + 1 sampled: table of 1 block
    seq = request.seqs[0]
    seq.spec_token_ids = draft_for(seq.token_ids, 8, good=1)  # positions 4..11: 3 blocks
    free_before = sim.kv.num_free_blocks
    out = sim.step()
    assert len(out.seqs[0].block_table) == 3  # blocks for every draft were allocated
    # draft 0 accepted, draft 1 rejected: tokens 0..4 computed, the 6th token is pending
    assert seq.num_computed_tokens == 5 and len(seq.token_ids) == 6
    assert len(sim.kv.block_table(seq.seq_id)) == 2  # the third block held only rejected drafts
    assert sim.kv.num_free_blocks == free_before - 1
    sim.kv.check_integrity()
    sim.run()
    assert sim.finished["a"] == reference_outputs([([1, 2, 3], 20, 1)])["r0"]


def test_short_pool_drops_drafts_before_preempting() -> None:
    sim = SpecSimEngine(num_blocks=3, block_size=4, max_num_batched_tokens=64, num_drafts=0)
    request = sim.add("a", [1, 2, 3], max_new=8)  # needs at most 3 blocks
    other = sim.add("b", [4], max_new=3)  # 1 block
    sim.step()
    seq = request.seqs[0]
    seq.spec_token_ids = draft_for(seq.token_ids, 6, good=6)  # would need 3 blocks now
    out = sim.step()
    assert {s.request_id for s in out.seqs} == {"a", "b"} and not out.preempted
    assert all(not s.draft_token_ids for s in out.seqs)
    assert other.seqs[0].num_output_tokens == 2


def test_prefix_cache_never_hashes_a_rejected_token() -> None:
    sim = SpecSimEngine(num_blocks=64, block_size=4, max_num_batched_tokens=64, num_drafts=6)
    sim.add("a", list(range(5)), max_new=30)
    sim.run()
    assert sim.drafted > sim.accepted > 0
    # A prompt that is a's whole text: its blocks come from the cache; the sim checks that
    # every slot read holds exactly that prefix's KV.
    full = list(range(5)) + sim.finished["a"][0]
    sim.add("b", full, max_new=5)
    sim.run()
    assert sim.kv.prefix_hits >= (len(full) - 1) // 4 - 1
    sim.kv.check_integrity()


def test_trim_frees_only_the_tail() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots(1, 0, 14) == []
    kv.cache_full_blocks(1, list(range(14)), 8)  # two full computed blocks hashed
    kv.trim(1, 9)
    assert len(kv.block_table(1)) == 3 and kv.num_free_blocks == 5
    kv.trim(1, 9)
    assert len(kv.block_table(1)) == 3
    kv.check_integrity()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    jobs=st.lists(
        st.tuples(
            st.lists(st.integers(0, 9), min_size=1, max_size=14),
            st.integers(1, 16),
        ),
        min_size=1,
        max_size=5,
    ),
    num_drafts=st.integers(1, 6),
    num_blocks=st.integers(14, 40),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(4, 24),
    prefix_caching=st.booleans(),
)
def test_speculative_output_equals_plain_decoding(
    jobs: list[tuple[list[int], int]],
    num_drafts: int,
    num_blocks: int,
    block_size: int,
    budget: int,
    prefix_caching: bool,
) -> None:
    sim = SpecSimEngine(
        num_blocks=num_blocks * 4 // block_size,
        block_size=block_size,
        max_num_batched_tokens=budget,
        prefix_caching=prefix_caching,
        num_drafts=num_drafts,
    )
    for i, (prompt, max_new) in enumerate(jobs):
        sim.add(f"r{i}", prompt, max_new)
    sim.run()
    assert sim.finished == reference_outputs([(p, m, 1) for p, m in jobs])
    assert sim.kv.num_free_blocks == sim.kv.num_blocks
