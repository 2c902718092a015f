"""Context parallelism over local worker processes joined by gloo: long prefill chunks split
over two ranks with ring attention, everything else run whole on each. Greedy parity with
transformers and with one rank, under chunked prefill (later chunks attend to earlier ones from
the cache), prefix-cache hits and preemption; ring attention against plain causal attention.
A rank that dies: `test_tensor_parallel.py`."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmscale import LLM
from llmscale.config import ConfigError
from llmscale.parallel.context import rank_segments, split_sizes

from .divergence import assert_parts_only_at_near_ties
from .hf_reference import hf_greedy
from .test_parity import _encode
from .test_tensor_parallel import NUM_TOKENS, _greedy, split_llm


def cp_llm(folder: Path, **engine_args: object) -> AbstractContextManager[LLM]:
    args = {"context_parallel_min_tokens": 8, "kv_cache_memory": "64MiB", **engine_args}
    return split_llm(folder, context_parallel_size=2, **args)


@given(st.integers(1, 5000), st.integers(1, 8))
def test_ranks_hold_segments_that_cover_the_chunk_with_equal_attention_work(n: int, size: int) -> None:
    sizes = split_sizes(n, 2 * size)
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    segments = rank_segments(n, size)
    assert sorted(i for pair in segments for seg in pair for i in seg) == list(range(n))
    # Causal (query, key) pairs per rank, a query at chunk position i attending to i + 1 keys:
    # equal but for the segments a token longer (a contiguous split's last rank would do
    # ~(2C - 1) times its first's).
    work = [sum(i + 1 for seg in pair for i in seg) for pair in segments]
    assert max(work) - min(work) <= 2 * n


def _count_splits(llm: LLM) -> list[int]:
    """Rank 0's split chunks from now on, counted as its runner asks for them."""
    context, counted = llm.llm_engine.runner.context, []
    split = context.split

    def counting(*args: object) -> object:
        result = split(*args)
        counted.append(result is not None)
        return result
    context.split = counting
    return counted


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3-rope"])
def test_two_ranks_match_transformers_and_one_rank(kind: str, tiny_model, prompts: list[str]) -> None:
    folder = tiny_model(kind)
    ids = _encode(folder, prompts)
    one_rank = _greedy(LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB"), ids)
    with cp_llm(folder) as llm:
        engine = llm.llm_engine
        assert len(engine.model.layers) == 2 and engine.model.lm_head is not None  # the whole model
        splits = _count_splits(llm)
        got = _greedy(llm, ids)
        assert any(splits)
        assert engine.kv.num_free_blocks == engine.num_blocks
    assert got == one_rank
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


@pytest.mark.parametrize("mode", ["chunked-prefill", "prefix-hits", "preemption"])
def test_two_ranks_keep_parity_with_cached_context_and_preemption(mode: str, tiny_model,
                                                                   prompts: list[str]) -> None:
    """Chunks after the first attend to what earlier chunks (or another request, through the
    prefix cache) left in each rank's cache, besides their own parts."""
    folder = tiny_model("llama")
    ids = _encode(folder, prompts)
    args = {"chunked-prefill": {"max_num_batched_tokens": 24},
            "prefix-hits": {"block_size": 4},
            "preemption": {"num_gpu_blocks_override": 10, "max_model_len": 128, "block_size": 16}}[mode]
    if mode == "prefix-hits":  # every prompt twice, the second time behind a shared prefix
        ids = ids + [ids[0][:12] + p for p in ids]
    with cp_llm(folder, **args) as llm:
        splits = _count_splits(llm)
        got = _greedy(llm, ids)
        assert any(splits)
        engine = llm.llm_engine
        if mode == "preemption":
            assert engine.scheduler.num_preemptions > 0
        elif mode == "prefix-hits":
            assert engine.kv.prefix_hits > 0
        assert engine.kv.num_free_blocks == engine.num_blocks
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


def _ring_rank(rank: int, port: int, out: Path) -> None:
    """Random cases, the same on every rank: a chunk of n tokens after `earlier` cached ones,
    split over the ranks; this rank's part attends through the ring."""
    import random

    import torch.distributed as dist
    import torch.nn.functional as F

    from llmscale.config import ParallelConfig
    from llmscale.model.attention import _gather_tokens
    from llmscale.parallel.context import ContextParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    context = ContextParallel(ParallelConfig(context_parallel_size=3, context_parallel_min_tokens=6), rank)
    rng, errors, complete = random.Random(7), [], []
    for case in range(30):
        n, earlier, group = rng.randint(6, 70), rng.choice([0, 0, 5, 33]), rng.choice([1, 3])
        kv_heads, d = 2, 16
        gen = torch.Generator().manual_seed(case)
        total = earlier + n
        q = torch.randn(total, kv_heads * group, d, generator=gen)
        k, v = torch.randn(total, kv_heads, d, generator=gen), torch.randn(total, kv_heads, d, generator=gen)
        bs, blocks = 4, -(-total // 4)
        k_cache, v_cache = torch.zeros(blocks, bs, kv_heads, d), torch.zeros(blocks, bs, kv_heads, d)
        table = torch.arange(blocks)
        part, ring, _ = context.split(n, torch.arange(earlier, total), earlier, 0, 0)
        mine = earlier + part  # two segments of the chunk
        for cache, x in ((k_cache, k), (v_cache, v)):  # the context, and this rank's part, as a layer writes
            cache.view(-1, kv_heads, d)[:earlier] = x[:earlier]
            cache.view(-1, kv_heads, d)[mine] = x[mine]
        got = ring.attend(q[mine], k[mine], v[mine], k_cache, v_cache, table, d ** -0.5,
                          lambda cache, t, name: _gather_tokens(cache, t, {}, name))
        mask = torch.ones(total, total, dtype=torch.bool).tril()[mine]
        want = F.scaled_dot_product_attention(q[mine].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=mask, scale=d ** -0.5, enable_gqa=True)
        want = want.transpose(0, 1)
        errors.append(float((got - want).abs().max()))
        complete.append(torch.equal(k_cache.view(-1, kv_heads, d)[:total], k)
                        and torch.equal(v_cache.view(-1, kv_heads, d)[:total], v))
    dist.destroy_process_group()
    torch.save((errors, complete), out / f"rank{rank}.pt")


def test_ring_attention_equals_causal_attention_and_fills_every_cache(tmp_path: Path) -> None:
    """Three ranks: each part attends to the cached context and every part up to its own through
    the ring, which equals one causal attention over the whole context; every part passes
    every rank, which writes it into its cache."""
    import torch.multiprocessing as mp

    from llmscale.serve.process import free_port

    mp.spawn(_ring_rank, args=(free_port(), tmp_path), nprocs=3)
    for rank in range(3):
        errors, complete = torch.load(tmp_path / f"rank{rank}.pt")
        assert max(errors) < 1e-5 and all(complete)


def test_the_default_model_in_its_default_dtype_splits_with_near_ties_only(llmscale_cache: Path) -> None:
    """SmolLM2 in its default dtype (bf16 where the CPU multiplies it): two ranks give one rank's
    greedy tokens up to near-ties. Ring attention sums each part's softmax in fp32 and merges in
    fp32, where one rank's bf16 attention rounds differently: measured, a part at a gap of
    exactly one bf16 step (0.125)."""
    from llmscale.engine.sampling_params import SamplingParams

    prompts = ["Write a long story about a dragon who learns to cook. The dragon lived in a cave near a "
               "village, and every day the villagers brought it food.",
               "List the planets of the solar system in order from the sun, with one fact about each."]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    runs = []
    for cp in (1, 2):
        llm = LLM(kv_cache_memory="64MiB", max_model_len=512, context_parallel_size=cp,
                  context_parallel_min_tokens=8)
        try:
            splits = _count_splits(llm) if cp > 1 else [True]
            runs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
            assert any(splits)
            bf16 = llm.llm_engine.model.activation_dtype == torch.bfloat16
        finally:
            llm.llm_engine.shutdown()
    assert_parts_only_at_near_ties(runs[0], [o.token_ids for o in runs[1]], max_gap=0.125 if bf16 else 0.01)


def test_context_parallelism_alone_and_its_threshold_checked(tiny_model) -> None:
    folder = str(tiny_model("llama"))
    with pytest.raises(ConfigError, match="does not combine with tensor or pipeline"):
        LLM(model=folder, context_parallel_size=2, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="context_parallel_min_tokens must be >= 1"):
        LLM(model=folder, context_parallel_size=2, context_parallel_min_tokens=0)
