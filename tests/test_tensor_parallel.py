"""Tensor parallelism over local worker processes joined by gloo: greedy parity with transformers
and with one rank, under chunked prefill and preemption; clear errors; a rank that dies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from llmscale import LLM, SamplingParams
from llmscale.config import ConfigError, activation_dtype
from llmscale.kernels import cpu as cpu_kernels
from llmscale.parallel.workers import WorkerDiedError
from llmscale.ray_cluster import is_loopback

from .divergence import assert_parts_only_at_near_ties
from .hf_reference import hf_greedy
from .live_server import start_server
from .test_parity import _encode
from .test_ray_cluster import _listeners

NUM_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


@contextmanager
def split_llm(folder: Path, **engine_args: object) -> Iterator[LLM]:
    """An fp32 engine on `folder` whose `engine_args` name its split, stopped after."""
    llm = LLM(model=str(folder), dtype="float32", **engine_args)
    try:
        yield llm
    finally:
        llm.llm_engine.shutdown()


def tp_llm(folder: Path, **engine_args: object) -> contextlib.AbstractContextManager[LLM]:
    return split_llm(folder, tensor_parallel_size=2, **engine_args)


def _greedy(llm: LLM, ids: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


# llama: 4 query and 2 KV heads, one KV head per rank; qwen2: q/k/v biases and tied embeddings;
# llama3-rope: a single KV head, replicated on both ranks.
@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3-rope"])
def test_two_ranks_match_transformers_and_one_rank(kind: str, tiny_model, prompts: list[str]) -> None:
    folder = tiny_model(kind)
    ids = _encode(folder, prompts)
    one_rank = _greedy(LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB"), ids)
    with tp_llm(folder, kv_cache_memory="64MiB") as llm:
        engine = llm.llm_engine
        attn = engine.model.layers[0].self_attn
        assert attn.num_heads == 2 and attn.num_kv_heads == 1
        assert engine.model.embed_tokens.weight.shape[0] == 49152 // 2  # a vocabulary shard
        got = _greedy(llm, ids)
        assert engine.runner.fused is None  # layers all-reduce between them: no fused decode
        ranks = {os.getpid(), *(p.pid for p in engine.workers.procs)}
        assert all(is_loopback(lsn.host) for lsn in _listeners() if lsn.pid in ranks)  # the store too
    assert got == one_rank
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


# Two ranks as two tensor-parallel shards or as two pipeline stages (with micro-batches in flight).
SPLITS = {"tensor": {"tensor_parallel_size": 2}, "pipeline": {"pipeline_parallel_size": 2}}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("mode", ["chunked-prefill", "preemption"])
def test_two_ranks_keep_parity_when_prefills_are_chunked_or_requests_preempted(
        mode: str, split: str, tiny_model, prompts: list[str]) -> None:
    folder = tiny_model("llama")
    ids = _encode(folder, prompts)
    args = ({"max_num_batched_tokens": 16} if mode == "chunked-prefill" else
            {"num_gpu_blocks_override": 10, "max_model_len": 128, "block_size": 16})
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB", **SPLITS[split], **args)
    try:
        got = _greedy(llm, ids)
        engine = llm.llm_engine
        if mode == "preemption":
            assert engine.scheduler.num_preemptions > 0
        else:
            assert max(map(len, ids)) > 16
        assert engine.kv.num_free_blocks == engine.num_blocks
    finally:
        llm.llm_engine.shutdown()
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_every_weight_format_shards(fmt: str, tiny_model, tmp_path: Path, prompts: list[str]) -> None:
    """bf16 weights and llmscale's int8/int4 checkpoints (int8 embeddings and lm_head too) split
    over two tensor-parallel ranks or two pipeline stages give one rank's greedy tokens; a rank's
    partial sums add up in another order (and in bf16 are rounded once more), so a divergence
    may only come at a near-tie: a top-2 logprob gap under 0.01 in fp32, a few bf16 steps
    (0.125) where activations are bf16."""
    from llmscale.compress.quantize import quantize_model

    folder = tiny_model("llama")
    max_gap = 0.01
    if fmt == "bf16":
        model, dtype = folder, "bfloat16"
        if activation_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16:
            max_gap = 0.125
    else:
        model = quantize_model(str(folder), fmt, 32, tmp_path / fmt, show_progress=False).out
        dtype = "float32"
    ids = _encode(folder, prompts)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    runs = []
    for split in ({}, {"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}):
        llm = LLM(model=str(model), dtype=dtype, kv_cache_memory="64MiB", **split)
        try:
            runs.append([o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in ids], params,
                                                            use_tqdm=False)])
        finally:
            llm.llm_engine.shutdown()
    for run in runs[1:]:
        assert_parts_only_at_near_ties(runs[0], [o.token_ids for o in run], max_gap)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_each_rank_pins_its_own_cores(tiny_model, prompts: list[str]) -> None:
    folder = tiny_model("llama")
    ids = _encode(folder, prompts[:2])
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        with tp_llm(folder, kv_cache_memory="64MiB", cpu_threads_bind="0|1") as llm:
            got = _greedy(llm, ids)
            assert os.sched_getaffinity(0) == {0}  # this thread ran rank 0's steps
            assert os.sched_getaffinity(llm.llm_engine.workers.procs[0].pid) == {1}  # its stepping thread
    finally:  # the rest of the session runs unpinned
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)
    with pytest.raises(ConfigError, match="1 CPU lists for 2 ranks"):
        LLM(model=str(folder), tensor_parallel_size=2, cpu_threads_bind="0-1")
    with pytest.raises(ConfigError, match="gives a core to two ranks"):
        LLM(model=str(folder), tensor_parallel_size=2, cpu_threads_bind="0|0")


def test_the_default_gguf_kept_quantized_splits_over_three_ranks(llmscale_cache: Path) -> None:
    """SmolLM2's 9 query and 3 KV heads split over 3 ranks (not 2), its Q4_1 blocks served as int4
    groups of 32: three ranks, or two pipeline stages of 15 layers, give one rank's greedy
    tokens, up to near-ties. The int4 kernels round activations to int8, where a last-bit
    difference in a sum (the ranks' partial sums meet in another order) can move a value by a
    whole step, so near-ties reach further than in fp32: the two runs' top logprobs differ by
    up to ~0.1 (measured parts at gaps of 0.012 and 0.048, of 0.126 once attention's sums took
    16 lanes, and of 0.22 on the AVX2 build, at a token whose best logprob was -3.44)."""
    from llmscale.model.lookup import default_model_path

    gguf = str(default_model_path())
    prompts = ["The capital of France is", "Write a short poem about the ocean."]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    runs = []
    for split in ({}, {"tensor_parallel_size": 3}, {"pipeline_parallel_size": 2}):
        llm = LLM(model=gguf, dtype="float32", kv_cache_memory="64MiB", max_model_len=512,
                  keep_quantized=True, **split)
        try:
            assert llm.llm_engine.model.layers[0].mlp.down_proj.quant.bits == 4
            runs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
        finally:
            llm.llm_engine.shutdown()
    for run in runs[1:]:
        assert_parts_only_at_near_ties(runs[0], [o.token_ids for o in run], max_gap=0.25)


def test_sizes_that_do_not_split_the_model_are_one_line_errors(tiny_model) -> None:
    folder = tiny_model("llama")  # 4 query heads, 2 KV heads
    with pytest.raises(ConfigError, match="does not divide the model's 4 attention heads"):
        LLM(model=str(folder), tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        LLM(model=str(folder), tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="stream_weights"):
        LLM(model=str(folder), tensor_parallel_size=2, stream_weights=True)


def test_a_rank_that_cannot_load_its_shard_is_a_one_line_error(tmp_path: Path) -> None:
    from llmscale.config import EngineConfig
    from llmscale.parallel.workers import WorkerGroup

    group = WorkerGroup(EngineConfig.from_kwargs(tensor_parallel_size=2), tmp_path, 128, 1 << 20)
    try:
        with pytest.raises(ConfigError, match=r"^tensor-parallel rank 1: ConfigError: no config.json in"):
            group.wait_loaded()
    finally:
        group.shutdown()


@pytest.mark.parametrize(("split", "named"), [
    ({"tensor_parallel_size": 2}, "tensor-parallel rank 1"),
    ({"pipeline_parallel_size": 2}, r"rank 1 \(pipeline stage 1\)"),
    ({"context_parallel_size": 2}, "context-parallel rank 1")], ids=["tensor", "pipeline", "context"])
def test_a_rank_that_dies_ends_the_engine_with_an_error_naming_it(split: dict, named: str, tiny_model,
                                                                 prompts: list[str]) -> None:
    folder = tiny_model("llama")
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB", **split)
    try:
        _greedy(llm, _encode(folder, prompts[:1]))
        worker = llm.llm_engine.workers.procs[0]
        worker.kill()
        worker.join()
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=named):
            _greedy(llm, _encode(folder, prompts[:1]))
        assert time.monotonic() - start < 30
    finally:
        llm.llm_engine.shutdown()


def _shm_rank(rank: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    from llmscale.parallel.shm import ShmAllReduce

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shm = ShmAllReduce(rank, 2, 16 * 64 * 4, lambda: None)
    gen = torch.Generator().manual_seed(rank)
    pairs = []
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 3, 16, 40):  # 40 rows pass the segment's 16 x 64 fp32 values: gloo's turn
            t = (torch.randn(rows, 60, generator=gen) * 100).to(dtype)  # 60: vectors of 8 and a tail
            before = t.clone()
            shm(t)
            pairs.append((before, t))
    dist.destroy_process_group()
    torch.save(pairs, out / f"rank{rank}.pt")


@pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels do not build on this machine")
def test_shared_memory_all_reduce_sums_to_the_same_bits_on_every_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from llmscale.serve.process import free_port

    mp.spawn(_shm_rank, args=(free_port(), tmp_path), nprocs=2)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for (a, sum0), (b, sum1) in zip(zero, one, strict=True):
        assert torch.equal(sum0, sum1)
        assert torch.equal(sum0, (a.float() + b.float()).to(a.dtype))  # fp32 sums, rounded once


def _worker_pids(server_pid: int) -> list[int]:
    """The server's tensor-parallel workers: its children (of any of its threads: the engine's
    thread starts them) started by multiprocessing's spawn."""
    children = [c for task in Path(f"/proc/{server_pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_serve_with_two_ranks_answers_then_stops_with_503_when_a_rank_dies(tiny_model, tmp_path: Path,
                                                                          prompts: list[str]) -> None:
    folder = tiny_model("llama")
    log = (tmp_path / "server.log").open("wb")
    url, proc = start_server("--model", str(folder), "--dtype", "float32", "--kv-cache-memory", "64MiB",
                             "--tensor-parallel-size", "2", stderr=log)
    try:
        ids = _encode(folder, prompts[:1])[0]
        body = {"model": str(folder), "prompt": ids, "max_tokens": NUM_TOKENS, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        from llmscale.model.tokenizer import Tokenizer

        expected = Tokenizer.from_folder(folder).decode(hf_greedy(folder, ids, NUM_TOKENS))
        assert r.json()["choices"][0]["text"] == expected
        (worker,) = _worker_pids(proc.pid)
        subprocess.run(["kill", "-9", str(worker)], check=True)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and "rank 1" in r.json()["error"]["message"]
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "rank 1" in text
    assert "float32 on cpu, tensor parallel over 2 ranks (mp), context" in text  # the banner
    assert "thread per rank" in text and "MiB float32 per rank" in text
