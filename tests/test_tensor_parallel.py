"""Tensor parallelism over local worker processes joined by gloo: greedy parity with transformers
and with one rank, under chunked prefill and preemption; clear errors; a rank that dies."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from llmscale import LLM, SamplingParams
from llmscale.config import ConfigError
from llmscale.parallel.workers import WorkerDiedError

from .hf_reference import hf_greedy
from .live_server import start_server

NUM_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


@contextmanager
def tp_llm(folder: Path, **engine_args: object) -> Iterator[LLM]:
    llm = LLM(model=str(folder), dtype="float32", tensor_parallel_size=2, **engine_args)
    try:
        yield llm
    finally:
        llm.llm_engine.shutdown()


def _ids(folder: Path, prompts: list[str]) -> list[list[int]]:
    from llmscale.model.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    return [tok.encode(p) for p in prompts]


def _greedy(llm: LLM, ids: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


# llama: 4 query and 2 KV heads, one KV head per rank; qwen2: q/k/v biases and tied embeddings;
# llama3-rope: a single KV head, replicated on both ranks.
@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3-rope"])
def test_two_ranks_match_transformers_and_one_rank(kind: str, tiny_model, prompts: list[str]) -> None:
    folder = tiny_model(kind)
    ids = _ids(folder, prompts)
    one_rank = _greedy(LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB"), ids)
    with tp_llm(folder, kv_cache_memory="64MiB") as llm:
        engine = llm.llm_engine
        attn = engine.model.layers[0].self_attn
        assert attn.num_heads == 2 and attn.num_kv_heads == 1
        assert engine.model.embed_tokens.weight.shape[0] == 49152 // 2  # a vocabulary shard
        got = _greedy(llm, ids)
        assert engine.runner.fused is None  # layers all-reduce between them: no fused decode
    assert got == one_rank
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


@pytest.mark.parametrize("mode", ["chunked-prefill", "preemption"])
def test_two_ranks_keep_parity_when_prefills_are_chunked_or_requests_preempted(
        mode: str, tiny_model, prompts: list[str]) -> None:
    folder = tiny_model("llama")
    ids = _ids(folder, prompts)
    args = ({"max_num_batched_tokens": 16} if mode == "chunked-prefill" else
            {"num_gpu_blocks_override": 10, "max_model_len": 128, "block_size": 16})
    with tp_llm(folder, kv_cache_memory="64MiB", **args) as llm:
        got = _greedy(llm, ids)
        engine = llm.llm_engine
        if mode == "preemption":
            assert engine.scheduler.num_preemptions > 0
        else:
            assert max(map(len, ids)) > 16
        assert engine.kv.num_free_blocks == engine.num_blocks
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


def test_sizes_that_do_not_split_the_model_are_one_line_errors(tiny_model) -> None:
    folder = tiny_model("llama")  # 4 query heads, 2 KV heads
    with pytest.raises(ConfigError, match="does not divide the model's 4 attention heads"):
        LLM(model=str(folder), tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        LLM(model=str(folder), tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="stream_weights"):
        LLM(model=str(folder), tensor_parallel_size=2, stream_weights=True)


def test_a_rank_that_dies_ends_the_engine_with_an_error_naming_it(tiny_model, prompts: list[str]) -> None:
    folder = tiny_model("llama")
    with tp_llm(folder, kv_cache_memory="64MiB") as llm:
        _greedy(llm, _ids(folder, prompts[:1]))
        worker = llm.llm_engine.workers.procs[0]
        worker.kill()
        worker.join()
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1"):
            _greedy(llm, _ids(folder, prompts[:1]))
        assert time.monotonic() - start < 30


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
        ids = _ids(folder, prompts[:1])[0]
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
    assert "rank 1" in (tmp_path / "server.log").read_text()
