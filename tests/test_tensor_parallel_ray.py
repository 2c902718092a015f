"""Worker ranks as Ray actors (`distributed_executor_backend="ray"`) on a local, loopback-only
Ray cluster: tensor-parallel parity with one rank and transformers, and a killed actor; tensor
and pipeline parallelism across two nodes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmscale import LLM
from llmscale.parallel.workers import WorkerDiedError
from llmscale.ray_cluster import is_loopback

from .hf_reference import hf_greedy
from .test_parity import _encode
from .test_ray_cluster import _children, _listeners
from .test_tensor_parallel import NUM_TOKENS, _greedy


def test_ranks_on_ray_match_one_rank_and_a_killed_actor_is_named(tiny_model, prompts: list[str]) -> None:
    import ray

    folder: Path = tiny_model("llama")
    ids = _encode(folder, prompts)
    one_rank = _greedy(LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB"), ids)
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB", tensor_parallel_size=2,
              distributed_executor_backend="ray", max_num_batched_tokens=16)  # chunked prefills too
    try:
        workers = llm.llm_engine.workers
        assert workers.one_machine  # so they all-reduce through shared memory
        got = _greedy(llm, ids)
        assert got == one_rank
        for p, g in zip(ids, got, strict=True):
            assert g == hf_greedy(folder, p, NUM_TOKENS)
        ray.kill(workers.actors[0])
        with pytest.raises(WorkerDiedError, match="rank 1"):
            _greedy(llm, ids[:1])
    finally:
        llm.llm_engine.shutdown()
    assert not ray.is_initialized()  # the engine started that cluster, and stopped it
    # A second engine in the same process starts a cluster again (Ray keeps the first token it
    # loaded for the process: every head this process starts shares one).
    again = LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB", tensor_parallel_size=2,
                distributed_executor_backend="ray")
    try:
        assert _greedy(again, ids[:1]) == one_rank[:1]
    finally:
        again.llm_engine.shutdown()


def _descendants(pid: int) -> set[int]:
    children, found, todo = _children(), {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def two_node_run(folder: str, prompts_json: str, tp: int, pp: int) -> None:
    """In a fresh interpreter whose environment makes Ray loopback-only with a token of its own
    (Ray reads both when imported, and caches the token per process, so a cluster with another
    token cannot start beside one a test before started): a cluster of a CPU-less head, where
    this driver attaches, and two 1-CPU nodes; `tp` x `pp` ranks on it. Prints {"one_machine",
    "wide" (listeners beyond loopback), "tokens"} as JSON."""
    import json

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        llm = LLM(model=folder, dtype="float32", kv_cache_memory="64MiB", tensor_parallel_size=tp,
                  pipeline_parallel_size=pp, distributed_executor_backend="ray", max_num_batched_tokens=16)
        try:
            one_machine = llm.llm_engine.workers.one_machine
            tokens = _greedy(llm, json.loads(prompts_json))
            ours = _descendants(os.getpid())
            wide = [f"{lsn.host}:{lsn.port} (pid {lsn.pid})" for lsn in _listeners()
                    if lsn.pid in ours and not is_loopback(lsn.host)]
        finally:
            llm.llm_engine.shutdown()
        print(json.dumps({"one_machine": one_machine, "wide": wide, "tokens": tokens}))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["tensor", "pipeline"])
def test_ranks_on_two_nodes_match_transformers(tp: int, pp: int, tiny_model, prompts: list[str]) -> None:
    """The worker rank lands on another node than rank 0's (`two_node_run`): tensor-parallel
    ranks all-reduce through gloo instead of shared memory, and pipeline stage 1 gets the
    residual stream through gloo, with the same tokens (chunked prefills, micro-batches in
    flight); every listener stays on loopback."""
    import json
    import secrets
    import subprocess
    import sys

    from llmscale.ray_cluster import AUTH_MODE_VAR, AUTH_TOKEN_VAR, HEAD_ENV

    folder: Path = tiny_model("llama")
    ids = _encode(folder, prompts[:2])
    code = (f"from tests.test_tensor_parallel_ray import two_node_run; "
            f"two_node_run({str(folder)!r}, {json.dumps(ids)!r}, {tp}, {pp})")
    env = {**os.environ, **HEAD_ENV, AUTH_MODE_VAR: "token", AUTH_TOKEN_VAR: secrets.token_hex(32)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["one_machine"]
    assert not result["wide"], f"listening beyond loopback: {result['wide']}"
    for p, g in zip(ids, result["tokens"], strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)
