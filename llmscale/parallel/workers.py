"""Tensor-parallel ranks as local worker processes, joined by torch.distributed.

Rank 0 is the engine's own process: it schedules, samples and runs its shard of every step.
`WorkerGroup.start` spawns ranks 1..T-1; each loads only its shard of the weights (one
checkpoint tensor at a time, as the engine does), sizes its KV cache from its own memory and
reports how many blocks fit. Once every rank has loaded, they form a process group (gloo on
CPU, NCCL on GPU) and agree on the smallest block count. Then each step rank 0 broadcasts the
step's delta (`step_delta.py`) and all ranks run the model together, all-reducing after every
row-parallel linear and the embedding, gathering the logits on rank 0.

Failures end the engine with a message naming the rank: a rank that cannot load its shard is a
one-line error before anything serves; a rank that dies while serving breaks the next
collective (its sockets close) and `check` names it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llmscale.config import ConfigError, EngineConfig

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0  # a rank reading its shard of a large checkpoint from a slow disk
# How long a collective waits for a rank that neither answers nor dies (a dead rank's closed
# sockets fail it at once); longer than any step.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


class WorkerDiedError(RuntimeError):
    pass


def threads_per_rank(world_size: int) -> int:
    """This machine's cores shared out, so the ranks' thread teams do not oversubscribe them."""
    return max(1, len(os.sched_getaffinity(0)) // world_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world_size: int, port: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)


def agree_num_blocks(capacity: int) -> int:
    """The KV block count every rank can hold: the smallest capacity."""
    t = torch.tensor([capacity], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class WorkerGroup:
    """Ranks 1..T-1 of a tensor-parallel engine, seen from rank 0."""

    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int) -> None:
        self.world_size = config.parallel.tensor_parallel_size
        self.port = _free_port()
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for rank in range(1, self.world_size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"llmscale-tp-rank{rank}", daemon=True,
                               args=(config, model_path, max_model_len, rank, self.port, theirs))
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        self.joined = False

    def wait_loaded(self) -> int:
        """The smallest KV capacity the workers report once their shards are in; a one-line
        error naming the first rank that failed or died."""
        capacities: dict[int, int] = {}
        pending = dict(enumerate(self.conns, start=1))
        while pending:
            ready = wait(list(pending.values()) + [p.sentinel for p in self.procs], timeout=LOAD_TIMEOUT_S)
            if not ready:
                raise ConfigError(f"tensor-parallel ranks {sorted(pending)} did not load within "
                                  f"{LOAD_TIMEOUT_S:.0f} s")
            for rank, conn in list(pending.items()):
                if conn in ready:
                    try:
                        kind, value = conn.recv()
                    except EOFError:
                        kind, value = "error", self._exit_text(rank)
                    if kind == "error":
                        raise ConfigError(f"tensor-parallel rank {rank}: {value}")
                    capacities[rank] = value
                    del pending[rank]
            for rank in list(pending):
                proc = self.procs[rank - 1]
                if not proc.is_alive() and not self.conns[rank - 1].poll():
                    raise ConfigError(f"tensor-parallel rank {rank}: {self._exit_text(rank)}")
        return min(capacities.values())

    def _exit_text(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        proc.join(timeout=1.0)
        return f"worker process {proc.pid} exited with code {proc.exitcode} before it had loaded"

    def join_group(self, device: torch.device, capacity: int) -> int:
        init_group(0, self.world_size, self.port, device)
        self.joined = True
        return agree_num_blocks(capacity)

    def send(self, delta: Any) -> None:
        dist.broadcast_object_list([delta], src=0)

    def check(self) -> None:
        """Raise `WorkerDiedError` naming the first rank that is no longer running."""
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                raise WorkerDiedError(f"tensor-parallel rank {rank} (pid {proc.pid}) died "
                                      f"(exit code {proc.exitcode})")

    def shutdown(self) -> None:
        if self.joined:
            try:
                self.check()
                self.send(None)
            except (WorkerDiedError, RuntimeError) as e:
                log.warning("stopping tensor-parallel workers: %s", e)
            dist.destroy_process_group()
            self.joined = False
        for proc in self.procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _worker_main(config: EngineConfig, model_path: Path, max_model_len: int, rank: int, port: int,
                 conn: Connection) -> None:
    from llmscale.engine.runner import ModelRunner
    from llmscale.engine.shard import load_rank_model
    from llmscale.parallel.step_delta import WorkerState

    world_size = config.parallel.tensor_parallel_size
    torch.set_num_threads(threads_per_rank(world_size))
    try:
        shard = load_rank_model(config, model_path, max_model_len, rank, world_size)
    except Exception as e:  # noqa: BLE001 (reported to rank 0 as one line)
        conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))
        return
    conn.send(("loaded", shard.kv_capacity))
    conn.close()
    device = config.torch_device
    init_group(rank, world_size, port, device)
    num_blocks = agree_num_blocks(shard.kv_capacity)
    model = shard.model
    runner = ModelRunner(model, config.cache.block_size, num_blocks, model.activation_dtype, device)
    state = WorkerState()
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        runner.execute(state.apply(box[0]), state)  # type: ignore[arg-type]
    dist.destroy_process_group()
