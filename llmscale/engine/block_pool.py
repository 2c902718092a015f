"""Physical KV blocks: ref counts, the free list, and the hash -> block map of the prefix cache.

A block whose ref count drops to zero goes to the back of the free list but keeps its hash,
so a later request with the same prefix can revive it; allocation takes from the front, so
the least recently freed cached block is evicted first (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = evicted first). OrderedDict gives O(1) removal
        # when a cached free block is revived by a prefix hit.
        self.free_blocks: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached_blocks: dict[int, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free_blocks):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free_blocks)} free")
        out = []
        for _ in range(n):
            _, block = self.free_blocks.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        # In address order: a freed sequence's blocks come back tail first, and the decode
        # kernel reads a run of blocks faster ascending than descending (BENCHMARKS.md, "KV
        # block order"). Which blocks are evicted is unchanged.
        out.sort(key=lambda b: b.block_id)
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None
            self.num_evictions += 1

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits, reviving free ones."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_blocks[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference on each block. Callers pass tail blocks first, so the tail of a
        sequence is evicted before its (more shareable) head."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed with ref count {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if not self.enable_caching:
                    block.block_hash = None
                self.free_blocks[block.block_id] = block

    def cache_full_block(self, block: KVBlock, block_hash: int) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached_blocks:
            return  # an identical block is already cached; keep the first
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block

    def lookup(self, block_hash: int) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def reset_prefix_cache(self) -> None:
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
