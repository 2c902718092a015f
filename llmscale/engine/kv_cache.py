"""Per-request block tables on top of the `BlockPool`, and prefix-cache lookup.

A full block is identified by a chained hash: hash(parent block's hash, this block's token
ids), so equal hashes mean equal whole prefixes, not just equal blocks.
"""

from __future__ import annotations

from llmscale.engine.block_pool import BlockPool, KVBlock
from llmscale.engine.request import Request


def hash_block(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_hashes: dict[str, list[int]] = {}
        self.req_num_offered: dict[str, int] = {}  # leading blocks already offered to the prefix cache
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, request: Request, upto_tokens: int) -> list[int]:
        """Chained hashes of the request's full blocks within its first `upto_tokens` tokens.

        Memoized per request, and the memo may run further (admission hashes the whole prompt),
        so the answer is sliced: a block past `upto_tokens` is not full yet.
        """
        hashes = self.req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = request.all_token_ids
        num_full = upto_tokens // bs
        while len(hashes) < num_full:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tuple(tokens[i * bs:(i + 1) * bs])))
        return hashes[:num_full]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of a new (or preempted) request: (blocks, tokens they hold).

        At least one token is always left to compute, since its logits are needed.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position's logits, so compute all
        hashes = self._block_hashes(request, request.num_tokens - 1)
        hits: list[KVBlock] = []
        for h in hashes:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens; False (and no change) if blocks ran out."""
        blocks = self.req_blocks.get(request.request_id, [])
        computed_blocks = computed_blocks or []
        # Touching a free cached hit also removes it from the free list, so count those.
        revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        num_tokens = request.num_computed_tokens + num_new_tokens
        need = self.blocks_needed(num_tokens) - len(blocks) - len(computed_blocks)
        if need + revived > self.pool.num_free_blocks:
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks = blocks + computed_blocks
        if need > 0:
            blocks = blocks + self.pool.allocate(need)
        self.req_blocks[request.request_id] = blocks
        if self.enable_prefix_caching:
            # Blocks that will be full once this step's tokens are written become shareable now:
            # within a step every layer writes its K/V before it reads any.
            hashes = self._block_hashes(request, num_tokens)
            start = self.req_num_offered.get(request.request_id, 0)
            for block, h in zip(blocks[start:len(hashes)], hashes[start:], strict=True):
                self.pool.cache_full_block(block, h)
            self.req_num_offered[request.request_id] = len(hashes)
        return True

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self.req_hashes.pop(request.request_id, None)
        self.req_num_offered.pop(request.request_id, None)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
