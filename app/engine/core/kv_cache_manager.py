"""Per-sequence block tables over the BlockPool: prefix cache, allocate, fork, copy on write.

Speaks ints only (sequence ids, token ids, block ids) so it is tested without torch.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from app.engine.core.block_pool import BlockPool, KVBlock


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int], cache_salt: int = 0) -> bytes:
    """Chained digest of a full block: equal hashes mean equal token prefixes computed under
    the same ``cache_salt`` (a namespace: 0 is the base model, a LoRA adapter has its own id).
    The salt seeds the chain's first block only; every later hash chains from it."""
    digest = hashlib.blake2b(digest_size=16)
    if parent_hash is not None:
        digest.update(parent_hash)
    elif cache_salt:
        digest.update(b"root:" + cache_salt.to_bytes(8, "little", signed=True))
    else:
        digest.update(b"root")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns the block tables of all live sequences."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._tables: dict[int, list[KVBlock]] = {}
        # Chained hashes of each sequence's leading full, computed blocks.
        self._hashes: dict[int, list[bytes]] = {}
        self.prefix_queries = 0  # full prompt blocks looked up
        self.prefix_hits = 0  # of which found in the cache

    # -- queries -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_table(self, seq_id: int) -> list[int]:
        return [b.block_id for b in self._tables.get(seq_id, ())]

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # -- prefix cache --------------------------------------------------------------------
    def find_cached_prefix(self, token_ids: Sequence[int], cache_salt: int = 0) -> list[KVBlock]:
        """Leading full blocks of `token_ids` already in the cache under `cache_salt`.

        Capped so the last token is always computed: its logits are needed to sample.
        """
        if not self.pool.enable_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits: list[KVBlock] = []
        parent: bytes | None = None
        for i in range(max_blocks):
            tokens = token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block(parent, tokens, cache_salt)
            block = self.pool.get_cached(parent)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += max_blocks
        self.prefix_hits += len(hits)
        return hits

    def cache_full_blocks(
        self, seq_id: int, token_ids: Sequence[int], num_computed: int, cache_salt: int = 0
    ) -> None:
        """Register the sequence's newly full and computed blocks in the prefix cache, in
        the `cache_salt` namespace (the one its prefix was looked up in)."""
        if not self.pool.enable_caching:
            return
        table = self._tables[seq_id]
        hashes = self._hashes[seq_id]
        num_full = min(num_computed // self.block_size, len(table))
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            tokens = token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block(parent, tokens, cache_salt)
            hashes.append(parent)
            self.pool.cache_block(table[i], parent)

    # -- allocation ----------------------------------------------------------------------
    def allocate_slots(
        self,
        seq_id: int,
        num_computed_tokens: int,
        num_new_tokens: int,
        cached_blocks: Sequence[KVBlock] = (),
    ) -> list[tuple[int, int]] | None:
        """Make the table cover `num_computed_tokens + num_new_tokens` slots.

        `cached_blocks` (prefix hits, for a sequence without a table yet) are adopted first.
        Returns the copy-on-write `(src, dst)` block pairs the runner must copy before the
        forward, or None (changing nothing) when the pool has too few free blocks.
        """
        table = self._tables.get(seq_id)
        if table is None:
            table = []
            if cached_blocks and num_computed_tokens != len(cached_blocks) * self.block_size:
                raise ValueError("num_computed_tokens must equal the cached prefix length")
        elif cached_blocks:
            raise ValueError(f"sequence {seq_id} already has blocks; cannot adopt a prefix")
        have = len(table) + len(cached_blocks)
        need_total = self.blocks_for_tokens(num_computed_tokens + num_new_tokens)
        # Blocks this step writes into that other sequences also use must be copied first.
        first_write = num_computed_tokens // self.block_size
        shared = [i for i in range(first_write, len(table)) if table[i].ref_cnt > 1]
        revived = sum(1 for b in cached_blocks if b.ref_cnt == 0)
        fresh = max(0, need_total - have) + len(shared)
        if fresh + revived > self.pool.num_free_blocks:
            return None

        for block in cached_blocks:
            self.pool.touch(block)
        if seq_id not in self._tables:
            self._tables[seq_id] = table
            self._hashes[seq_id] = [b.block_hash for b in cached_blocks if b.block_hash]
        table.extend(cached_blocks)
        copies: list[tuple[int, int]] = []
        for i in shared:
            old = table[i]
            new = self.pool.allocate()
            self.pool.free([old])
            table[i] = new
            copies.append((old.block_id, new.block_id))
        for _ in range(need_total - len(table)):
            table.append(self.pool.allocate())
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (copy on write later)."""
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id} already has blocks")
        table = self._tables[parent_id]
        for block in table:
            self.pool.touch(block)
        self._tables[child_id] = list(table)
        self._hashes[child_id] = list(self._hashes[parent_id])

    def trim(self, seq_id: int, num_tokens: int) -> None:
        """Free the table's blocks beyond the first `num_tokens` slots (rejected speculative
        tokens' tail). Those blocks were never hashed: only fully computed blocks are."""
        table = self._tables.get(seq_id)
        keep = self.blocks_for_tokens(num_tokens)
        if table is None or len(table) <= keep:
            return
        if len(self._hashes[seq_id]) > keep:
            raise ValueError(f"sequence {seq_id}: cannot trim cached blocks")
        tail = table[keep:]
        del table[keep:]
        self.pool.free(reversed(tail))

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks; tail blocks first so shared prefixes stay cached longest."""
        table = self._tables.pop(seq_id, None)
        self._hashes.pop(seq_id, None)
        if table:
            self.pool.free(reversed(table))

    def check_integrity(self) -> None:
        """Every block is free or owned, and refcounts equal the number of table entries."""
        refs: dict[int, int] = {}
        for table in self._tables.values():
            for block in table:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
        self.pool.check_integrity(refs)
