"""Worker ranks as local processes, joined by torch.distributed.

Rank 0 is the engine's own process: it schedules, samples and runs its part of every step.
`WorkerGroup` spawns ranks 1..T*P-1 (T tensor-parallel ranks in each of P pipeline stages);
each loads only its part of the weights (one checkpoint tensor at a time, as the engine does),
sizes its KV cache from its own memory and reports how many blocks fit. Once every rank has
loaded, they form a process group (gloo on CPU, NCCL on GPU), a tensor-parallel group per
stage, and agree on the smallest block count. Then each step rank 0 sends the step's delta
(`step_delta.py`) down a pipe to each worker and all ranks run the model together: within a
stage all-reducing after every row-parallel linear and the embedding (through shared memory
between CPU ranks: `shm.py`) and gathering the logits on the stage's first rank, between
stages passing the residual stream (`pipeline.py`).

Failures end the engine with a message naming the rank: a rank that cannot load its part is a
one-line error before anything serves; a rank that dies while serving breaks the next step
(its pipe or sockets close, or the shared-memory wait finds it gone) and `check` names it.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import pickle
import socket
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from llmscale.config import ConfigError, EngineConfig, ParallelConfig
from llmscale.kernels import cpu as cpu_kernels
from llmscale.model.layers import AllReduce, use_tp_group
from llmscale.parallel.context import ContextParallel
from llmscale.parallel.pipeline import StageLink, run_stage
from llmscale.parallel.shm import ShmAllReduce

if TYPE_CHECKING:
    from llmscale.parallel.ray_workers import RayWorkerGroup

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0  # a rank reading its shard of a large checkpoint from a slow disk
# How long a collective waits for a rank that neither answers nor dies (a dead rank's closed
# sockets fail it at once); longer than any step.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


class WorkerDiedError(RuntimeError):
    pass


def threads_per_rank(world_size: int, cores: list[int] | None) -> int:
    """A rank's thread count: its own cores when it pins them, else its share of this machine's,
    so the ranks' thread teams do not oversubscribe the cores."""
    if cores is not None:
        return len(cores)
    return max(1, len(os.sched_getaffinity(0)) // world_size)


def listen_on(host: str) -> socket.socket:
    """A socket listening on `host` at a free port, for rank 0's rendezvous store: torch's own
    would listen on every interface."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(128)
    return s


def init_group(rank: int, world_size: int, address: str, device: torch.device,
               listen_fd: int | None = None) -> None:
    """Join the default process group whose rank 0 serves its store at `address` (host:port);
    rank 0 hands over the listening socket's descriptor (the store closes it)."""
    host, port = address.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world_size, rank == 0, timeout=COLLECTIVE_TIMEOUT,
                          master_listen_fd=listen_fd)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)


def choose_all_reduce(tp_rank: int, tp_size: int, group: dist.ProcessGroup, device: torch.device,
                      max_bytes: int, one_machine: bool, check_peers: Callable[[], None]) -> AllReduce:
    """How this rank sums partial results with the other ranks of its tensor-parallel `group`,
    decided once: NCCL on GPU; between CPU ranks on one machine, shared memory (an order of
    magnitude faster than gloo here: BENCHMARKS.md), where the C kernels build; else gloo."""
    if device.type == "cpu" and one_machine and cpu_kernels.available():
        return ShmAllReduce(tp_rank, tp_size, max_bytes, check_peers, group)
    return functools.partial(dist.all_reduce, group=group)


def settle_group(model: nn.Module, parallel: ParallelConfig, rank: int, device: torch.device, max_bytes: int,
                 one_machine: bool, check_peers: Callable[[], None], capacity: int) -> int:
    """Once a rank has joined the group, on every rank in this order (all are collectives): the
    tensor-parallel group of each pipeline stage, how `model` all-reduces within its own, then
    the KV block count every rank can hold (the smallest capacity)."""
    tp = parallel.tensor_parallel_size
    if tp > 1:
        stage, tp_rank = parallel.place(rank)
        groups = [dist.new_group(list(range(s * tp, (s + 1) * tp)))
                  for s in range(parallel.pipeline_parallel_size)]
        use_tp_group(model, groups[stage], choose_all_reduce(tp_rank, tp, groups[stage], device, max_bytes,
                                                             one_machine, check_peers))
    t = torch.tensor([capacity], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def stage_link(model: nn.Module, parallel: ParallelConfig, rank: int) -> StageLink | None:
    """This rank's link to its neighbouring pipeline stages; None without a pipeline."""
    if parallel.pipeline_parallel_size == 1:
        return None
    cfg = model.config
    return StageLink(parallel, rank, cfg.hidden_size, model.activation_dtype, cfg.vocab_size)


def context_of(parallel: ParallelConfig, rank: int) -> ContextParallel | None:
    """This rank's place among context-parallel ranks; None without them."""
    return ContextParallel(parallel, rank) if parallel.context_parallel_size > 1 else None


def rank_name(parallel: ParallelConfig, rank: int) -> str:
    """How errors name a rank: by its kind of parallelism, and its stage with a pipeline."""
    if parallel.context_parallel_size > 1:
        return f"context-parallel rank {rank}"
    if parallel.pipeline_parallel_size == 1:
        return f"tensor-parallel rank {rank}"
    stage, tp_rank = parallel.place(rank)
    return f"rank {rank} (pipeline stage {stage}" + (f", tensor-parallel rank {tp_rank})" if
                                                      parallel.tensor_parallel_size > 1 else ")")


def rank_error(error: BaseException) -> str:
    """A rank's start-up error as one line, with its type."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


def join_as_rank_zero(world_size: int, listener: socket.socket, device: torch.device) -> None:
    host, port = listener.getsockname()[:2]
    try:
        init_group(0, world_size, f"{host}:{port}", device, listener.detach())
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"process group of the ranks on {host}:{port}: "
                          f"{str(e).splitlines()[0]}") from None


class Rank:
    """A worker rank (1..T*P-1), whichever backend runs it: its part of the model, then its place
    in the group, then one step per delta."""

    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int, rank: int) -> None:
        from llmscale.engine.shard import load_rank_model

        self.config, self.rank = config, rank
        self.world_size = config.parallel.world_size
        self.cores = config.rank_cores(rank)
        torch.set_num_threads(threads_per_rank(self.world_size, self.cores))
        self.shard = load_rank_model(config, model_path, max_model_len, rank)

    def join(self, address: str, max_bytes: int, one_machine: bool, check_peers: Callable[[], None]) -> None:
        from llmscale.engine.runner import ModelRunner
        from llmscale.parallel.step_delta import WorkerState

        device, parallel = self.config.torch_device, self.config.parallel
        init_group(self.rank, self.world_size, address, device)
        model = self.shard.model
        num_blocks = settle_group(model, parallel, self.rank, device, max_bytes, one_machine, check_peers,
                                  self.shard.kv_capacity)
        self.runner = ModelRunner(model, self.config.cache.block_size, num_blocks, self.shard.kv_dtype,
                                  device, self.cores if device.type == "cpu" else None,
                                  context_of(parallel, self.rank))
        self.state = WorkerState()
        self.link = stage_link(model, parallel, self.rank)

    def execute(self, delta: Any) -> None:
        batch = self.state.apply(delta)
        if self.link is None:
            self.runner.execute(batch, self.state)  # type: ignore[arg-type]
        else:
            run_stage(self.runner, batch, self.state, self.link)

    def close(self) -> None:
        if self.link is not None:
            self.link.flush()
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerGroup:
    """Ranks 1..T*P-1 of a parallel engine as local processes, seen from rank 0."""

    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int, max_bytes: int) -> None:
        """`max_bytes`: the largest tensor a step all-reduces (its token budget x hidden size in fp32)."""
        self.parallel = config.parallel
        self.world_size = config.parallel.world_size
        self.max_bytes = max_bytes
        self.listener = listen_on("127.0.0.1")
        self.port = self.listener.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for rank in range(1, self.world_size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"llmscale-rank{rank}", daemon=True,
                               args=(config, model_path, max_model_len, max_bytes, rank, self.port, theirs))
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
            ready = wait(list(pending.values()) + [self.procs[rank - 1].sentinel for rank in pending],
                         timeout=LOAD_TIMEOUT_S)
            if not ready:
                raise ConfigError(f"ranks {sorted(pending)} did not load within "
                                  f"{LOAD_TIMEOUT_S:.0f} s")
            for rank, conn in list(pending.items()):
                if conn in ready:
                    try:
                        kind, value = conn.recv()
                    except EOFError:
                        kind, value = "error", self._exit_text(rank)
                    if kind == "error":
                        raise ConfigError(f"{rank_name(self.parallel, rank)}: {value}")
                    capacities[rank] = value
                    del pending[rank]
            for rank in list(pending):
                proc = self.procs[rank - 1]
                if not proc.is_alive() and not self.conns[rank - 1].poll():
                    raise ConfigError(f"{rank_name(self.parallel, rank)}: {self._exit_text(rank)}")
        return min(capacities.values())

    def _exit_text(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        proc.join(timeout=1.0)
        return (f"worker process {proc.pid} exited with code {proc.exitcode} before it had loaded (a script "
                f"that builds the engine must do so under `if __name__ == \"__main__\":`, since each worker "
                f"process imports it again)")

    def join_group(self, model: nn.Module, device: torch.device, capacity: int) -> int:
        """Form the process group with the workers, set up how `model` all-reduces, and return
        the KV block count every rank holds."""
        join_as_rank_zero(self.world_size, self.listener, device)
        self.joined = True
        return settle_group(model, self.parallel, 0, device, self.max_bytes, True, self.check, capacity)

    def send(self, delta: Any) -> None:
        """Hand every worker the step's delta (None: stop), pickled once. Through a pipe, not a
        collective: a worker waits for the next step as long as the engine idles, where a
        collective would time out."""
        data = pickle.dumps(delta, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            conn.send_bytes(data)

    def check(self) -> None:
        """Raise `WorkerDiedError` naming the first rank that is no longer running."""
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                raise WorkerDiedError(f"{rank_name(self.parallel, rank)} (pid {proc.pid}) died "
                                      f"(exit code {proc.exitcode})")

    def shutdown(self) -> None:
        if self.joined:
            try:
                self.check()
                self.send(None)
            except (RuntimeError, OSError) as e:
                log.warning("stopping worker ranks: %s", e)
            dist.destroy_process_group()
            self.joined = False
        self.listener.close()
        for conn in self.conns:
            conn.close()  # a worker still waiting for a step reads EOF and ends
        for proc in self.procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


def start_workers(config: EngineConfig, model_path: Path, max_model_len: int, max_bytes: int
                  ) -> WorkerGroup | RayWorkerGroup:
    """Ranks 1..T*P-1 on the configured backend, loading their parts while rank 0 loads its own."""
    if config.parallel.distributed_executor_backend == "ray":
        from llmscale.parallel.ray_workers import RayWorkerGroup

        return RayWorkerGroup(config, model_path, max_model_len, max_bytes)
    return WorkerGroup(config, model_path, max_model_len, max_bytes)


def _parent_alive(parent: int) -> Callable[[], None]:
    def check() -> None:
        if os.getppid() != parent:
            raise WorkerDiedError(f"rank 0 (pid {parent}) exited")
    return check


def _worker_main(config: EngineConfig, model_path: Path, max_model_len: int, max_bytes: int, rank: int,
                 port: int, conn: Connection) -> None:
    try:
        worker = Rank(config, model_path, max_model_len, rank)
    except Exception as e:  # noqa: BLE001 (reported to rank 0 as one line)
        conn.send(("error", rank_error(e)))
        return
    conn.send(("loaded", worker.shard.kv_capacity))
    worker.join(f"127.0.0.1:{port}", max_bytes, True, _parent_alive(os.getppid()))
    while True:
        try:
            delta = pickle.loads(conn.recv_bytes())
        except EOFError:  # rank 0 is gone
            break
        if delta is None:
            break
        worker.execute(delta)
    worker.close()
