"""Fixed-size KV blocks with refcounts, an O(1) free list and a hash -> block prefix cache.

Pure Python (no torch): the pool only hands out block ids; the tensors live in the
model runner. Freed blocks keep their hash and stay reusable until they are evicted,
which happens in least-recently-freed order when a fresh block is needed.
"""

from __future__ import annotations

from collections.abc import Iterable


class KVBlock:
    """One block of `block_size` token slots. `ref_cnt` counts the sequences using it."""

    __slots__ = ("block_hash", "block_id", "next_free", "prev_free", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        # Doubly linked free list: O(1) removal when a prefix hit revives a free block.
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return (
            f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"
        )


class _FreeList:
    """Doubly linked list of blocks with ref_cnt == 0, oldest-freed first."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self.head: KVBlock | None = None
        self.tail: KVBlock | None = None
        self.size = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVBlock) -> None:
        block.prev_free, block.next_free = self.tail, None
        if self.tail is None:
            self.head = block
        else:
            self.tail.next_free = block
        self.tail = block
        self.size += 1

    def remove(self, block: KVBlock) -> None:
        if block.prev_free is None:
            self.head = block.next_free
        else:
            block.prev_free.next_free = block.next_free
        if block.next_free is None:
            self.tail = block.prev_free
        else:
            block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.size -= 1

    def popleft(self) -> KVBlock:
        block = self.head
        if block is None:
            raise IndexError("free list is empty")
        self.remove(block)
        return block

    def __iter__(self):  # type: ignore[no-untyped-def]
        node = self.head
        while node is not None:
            yield node
            node = node.next_free


class NoFreeBlocksError(RuntimeError):
    """Raised when a block is requested from an empty pool (callers check first)."""


class BlockPool:
    """All KV blocks of the engine; O(1) allocate, free and prefix-cache hit."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = _FreeList(self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self._free.size

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - self._free.size / self.num_blocks

    def allocate(self) -> KVBlock:
        """Take the least recently freed block, evicting its cached hash."""
        if self._free.size == 0:
            raise NoFreeBlocksError("no free KV blocks")
        block = self._free.popleft()
        self._evict(block)
        block.ref_cnt = 1
        return block

    def touch(self, block: KVBlock) -> None:
        """Add a user to a block (prefix hit or fork); revive it if it was free."""
        if block.ref_cnt == 0:
            self._free.remove(block)
        block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one user from each block; blocks nobody uses go to the free list tail."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    def get_cached(self, block_hash: bytes) -> KVBlock | None:
        if not self.enable_caching:
            return None
        return self._cached.get(block_hash)

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Register a full block under its chained hash; the first holder of a hash wins."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    def check_integrity(self, expected_refs: dict[int, int]) -> None:
        """Every block is either free (ref 0, on the free list) or owned with the right count.

        `expected_refs` maps block id -> number of block-table entries referencing it.
        """
        free_ids = {b.block_id for b in self._free}
        if len(free_ids) != self._free.size:
            raise AssertionError("free list size does not match its contents")
        for block in self.blocks:
            want = expected_refs.get(block.block_id, 0)
            if block.ref_cnt != want:
                raise AssertionError(
                    f"block {block.block_id}: ref_cnt {block.ref_cnt} but {want} owners"
                )
            if (block.ref_cnt == 0) != (block.block_id in free_ids):
                raise AssertionError(f"block {block.block_id}: free-list membership is wrong")
        for block_hash, block in self._cached.items():
            if block.block_hash != block_hash:
                raise AssertionError(f"cache entry for block {block.block_id} has a stale hash")
