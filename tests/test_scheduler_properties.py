"""Property tests (hypothesis) for the block pool, KV cache manager and schedulers.

The model is replaced by its effect on bookkeeping: a scheduled request's computed tokens
advance, and one that reaches its end gets a token drawn from a small vocabulary (so prefixes
repeat and the prefix cache is exercised).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscale.config import SchedulerConfig
from llmscale.engine.block_pool import BlockPool
from llmscale.engine.kv_cache import KVCacheManager, hash_block
from llmscale.engine.request import Request, RequestStatus
from llmscale.engine.sampling_params import SamplingParams
from llmscale.engine.scheduler import make_scheduler


def check_pool(kv: KVCacheManager, live: list[Request]) -> None:
    pool = kv.pool
    refs = [0] * pool.num_blocks
    for r in live:
        for bid in kv.block_ids(r.request_id):
            refs[bid] += 1
    for block in pool.blocks:
        assert block.ref_cnt >= 0
        assert block.ref_cnt == refs[block.block_id], "ref count differs from block-table references"
        assert (block.ref_cnt == 0) == (block.block_id in pool.free_blocks), "leaked or double-freed"
    for h, block in pool.cached_blocks.items():
        assert block.block_hash == h
    # Requests that are not running hold no blocks.
    for r in live:
        if r.status != RequestStatus.RUNNING:
            assert not kv.block_ids(r.request_id)


def write_kv(kv: KVCacheManager, slots: dict[int, list], req: Request, num_new: int) -> None:
    """What a step does to the cache: each slot holds the prefix up to its position (its K/V
    depend on every earlier token)."""
    bs = kv.block_size
    table = kv.block_ids(req.request_id)
    for pos in range(req.num_computed_tokens, req.num_computed_tokens + num_new):
        slots.setdefault(table[pos // bs], [None] * bs)[pos % bs] = tuple(req.all_token_ids[:pos + 1])


def check_cached_blocks_hold_their_hash(kv: KVCacheManager, slots: dict[int, list]) -> None:
    """Once a step's K/V is written, every block in the prefix cache is full and holds
    exactly the prefix its chained hash names."""
    bs = kv.block_size
    for h, block in kv.pool.cached_blocks.items():
        written = slots.get(block.block_id, [None] * bs)
        assert None not in written, f"block {block.block_id} is cached but not fully written"
        prefix = written[-1]
        parent = None
        for i in range(len(prefix) // bs):
            parent = hash_block(parent, prefix[i * bs:(i + 1) * bs])
        assert parent == h, f"block {block.block_id} holds another prefix than its hash"


# (prompt length, max_tokens, shared-prefix id)
request_spec = st.tuples(st.integers(1, 80), st.integers(1, 24), st.integers(0, 3))


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(request_spec, min_size=1, max_size=12),
    num_blocks=st.integers(8, 40),
    block_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(1, 96),
    max_seqs=st.integers(1, 8),
    batching=st.sampled_from(["continuous", "static", "dynamic"]),
    caching=st.booleans(),
    abort_every=st.integers(0, 7),
    seed=st.integers(0, 2**16),
)
def test_scheduler_invariants(specs, num_blocks, block_size, budget, max_seqs, batching, caching,
                              abort_every, seed) -> None:
    rng = random.Random(seed)
    capacity = num_blocks * block_size
    kv = KVCacheManager(num_blocks, block_size, caching)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, batching=batching,
                             static_batch_size=3, batch_timeout_s=0.0)
    sched = make_scheduler(config, kv)
    prefixes = [[rng.randrange(50) for _ in range(40)] for _ in range(4)]
    live: list[Request] = []
    slots: dict[int, list] = {}  # block id -> what each of its slots holds
    for i, (plen, max_tokens, prefix) in enumerate(specs):
        plen = min(plen, capacity - 1)
        prompt = (prefixes[prefix] + [rng.randrange(50) for _ in range(plen)])[:plen]
        max_tokens = min(max_tokens, capacity - plen)  # what the engine's admission check allows
        req = Request(str(i), prompt, SamplingParams(max_tokens=max_tokens), max_tokens)
        sched.add(req)
        live.append(req)

    for step in range(2000):
        if not sched.has_unfinished():
            break
        if abort_every and step % abort_every == abort_every - 1:
            victims = [r for r in live if not r.is_finished]
            if victims and rng.random() < 0.3:
                sched.abort(rng.choice(victims))
        batch = sched.schedule()
        assert batch.num_tokens <= budget
        assert len(sched.running) <= max_seqs
        assert all(n > 0 for _, n in batch.scheduled)
        assert len({r.request_id for r, _ in batch.scheduled}) == len(batch.scheduled)
        for req, n in batch.scheduled:
            assert req.status == RequestStatus.RUNNING
            assert req.num_computed_tokens + n <= req.num_tokens
            assert len(kv.block_ids(req.request_id)) * block_size >= req.num_computed_tokens + n
            write_kv(kv, slots, req, n)
        check_cached_blocks_hold_their_hash(kv, slots)
        for req, n in batch.scheduled:
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:
                req.append_token(rng.randrange(50))
                if len(req.output_token_ids) >= req.max_tokens:
                    sched.finish(req, RequestStatus.FINISHED_LENGTH)
        check_pool(kv, live)
    else:
        pytest.fail("requests did not all finish within 2000 steps")

    for req in live:
        assert req.is_finished
        if req.status != RequestStatus.FINISHED_ABORTED:
            assert len(req.output_token_ids) == req.max_tokens
    assert kv.num_free_blocks == num_blocks


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "cache", "touch"]), st.integers(1, 6)),
                    max_size=60))
def test_block_pool_ref_counts(ops) -> None:
    pool = BlockPool(16, enable_caching=True)
    held: list[list] = []
    next_hash = 0
    for op, n in ops:
        if op == "alloc" and n <= pool.num_free_blocks:
            held.append(pool.allocate(n))
        elif op == "free" and held:
            pool.free(list(reversed(held.pop(n % len(held)))))
        elif op == "cache" and held:
            for block in held[n % len(held)]:
                pool.cache_full_block(block, next_hash)
                next_hash += 1
        elif op == "touch" and pool.cached_blocks:
            hits = list(pool.cached_blocks.values())[:n]
            pool.touch(hits)
            held.append(hits)
        counts = {}
        for blocks in held:
            for b in blocks:
                counts[b.block_id] = counts.get(b.block_id, 0) + 1
        for b in pool.blocks:
            assert b.ref_cnt == counts.get(b.block_id, 0)
            assert (b.ref_cnt == 0) == (b.block_id in pool.free_blocks)
    for blocks in held:
        pool.free(blocks)
    assert pool.num_free_blocks == 16


def test_double_free_is_an_error() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="ref count"):
        pool.free(blocks)


def test_lru_evicts_least_recently_freed_cached_block() -> None:
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for block, h in ((a, 1), (b, 2), (c, 3)):
        pool.cache_full_block(block, h)
    pool.free([c])
    pool.free([a])
    pool.free([b])
    (first,) = pool.allocate(1)
    assert first is c and pool.lookup(3) is None
    assert pool.lookup(1) is a and pool.lookup(2) is b


def test_prefix_hit_shares_blocks() -> None:
    kv = KVCacheManager(16, 4)
    params = SamplingParams(max_tokens=4)
    first = Request("a", list(range(10)), params, 4)
    first.status = RequestStatus.RUNNING
    assert kv.allocate_slots(first, 10)
    second = Request("b", list(range(9)) + [99], params, 4)
    blocks, num_computed = kv.get_computed_blocks(second)
    assert num_computed == 8  # two full blocks of 4 shared; the rest is new
    second.num_computed_tokens = num_computed
    assert kv.allocate_slots(second, 2, blocks)
    assert kv.block_ids("a")[:2] == kv.block_ids("b")[:2]
    assert kv.block_ids("a")[2] != kv.block_ids("b")[2]
    assert all(kv.pool.blocks[i].ref_cnt == 2 for i in kv.block_ids("a")[:2])
