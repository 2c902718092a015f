"""Worker ranks as Ray actors (`--distributed-executor-backend ray`).

The same ranks as `workers.py`'s processes, placed by Ray instead: a placement group holds one
bundle per rank (bundle 0 is rank 0, this process; PACK puts them on one node when they fit,
else across nodes), and ranks 1..T*P-1 are actors in the other bundles. The engine joins the
Ray cluster at RAY_ADDRESS or starts a loopback-only one (`llmscale.ray_cluster`). Each step,
rank 0 calls every actor's `execute` with the step's delta (Ray keeps one caller's calls to an
actor in order) and runs its own part; tensor-parallel ranks meet in the all-reduces, through
shared memory when every rank is on rank 0's node, else gloo, and pipeline stages pass the
residual stream through gloo. A dead actor resolves its pending call with an error, which
`check` turns into one naming the rank.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmscale.config import ConfigError, EngineConfig
from llmscale.parallel.workers import (
    Rank,
    WorkerDiedError,
    join_as_rank_zero,
    listen_on,
    rank_error,
    rank_name,
    settle_group,
    threads_per_rank,
)

PLACEMENT_TIMEOUT_S = 60.0


class RankActor:
    """A `Rank` in a Ray actor (made remote where Ray is imported: `RayWorkerGroup`)."""

    def load(self, config: EngineConfig, model_path: Path, max_model_len: int, rank: int) -> tuple[int, str]:
        import ray

        self.rank = Rank(config, model_path, max_model_len, rank)
        return self.rank.shard.kv_capacity, ray.get_runtime_context().get_node_id()

    def join(self, address: str, max_bytes: int, one_machine: bool) -> None:
        # A dead rank 0 takes its actors with it (Ray ends the actors a driver owns).
        self.rank.join(address, max_bytes, one_machine, lambda: None)

    def execute(self, delta: Any) -> None:
        self.rank.execute(delta)

    def close(self) -> None:
        self.rank.close()


def _cause(error: BaseException) -> BaseException:
    """The exception a Ray task raised, out of Ray's wrapper."""
    return getattr(error, "cause", None) or error


class RayWorkerGroup:
    """Ranks 1..T*P-1 as Ray actors, seen from rank 0: `WorkerGroup`'s interface."""

    def __init__(self, config: EngineConfig, model_path: Path, max_model_len: int, max_bytes: int) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from llmscale.ray_cluster import connect

        self.parallel = config.parallel
        self.world_size = config.parallel.world_size
        self.max_bytes = max_bytes
        self.joined = False
        # Each launched step's calls, one per actor, until done: up to P steps are in flight.
        self.pending: deque[list[Any]] = deque()
        self.depth = config.parallel.pipeline_parallel_size
        self.actors: list[Any] = []
        self.cluster = None if ray.is_initialized() else connect(os.environ.get("RAY_ADDRESS"),
                                                                 log_to_driver=False)
        cpus = threads_per_rank(self.world_size, config.rank_cores(0))
        self.pg = placement_group([{"CPU": cpus}] * self.world_size, strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self.shutdown()
            raise ConfigError(f"Ray cannot place {self.world_size} ranks of {cpus} CPUs each "
                              f"(cluster resources: {ray.cluster_resources()})")
        actor = ray.remote(RankActor)
        self.actors = [actor.options(num_cpus=cpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=rank)).remote() for rank in range(1, self.world_size)]
        self.loads = [a.load.remote(config, model_path, max_model_len, rank)
                      for rank, a in enumerate(self.actors, start=1)]
        self.one_machine = True  # until the ranks report their nodes (`wait_loaded`)

    def wait_loaded(self) -> int:
        import ray

        loaded = []
        for rank, ref in enumerate(self.loads, start=1):
            try:
                loaded.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 (the rank's own error, as one line)
                raise ConfigError(f"{rank_name(self.parallel, rank)}: {rank_error(_cause(e))}") from None
        node = ray.get_runtime_context().get_node_id()
        self.one_machine = all(actor_node == node for _, actor_node in loaded)
        return min(capacity for capacity, _ in loaded)

    def join_group(self, model: nn.Module, device: torch.device, capacity: int) -> int:
        import ray

        listener = listen_on(ray.util.get_node_ip_address())
        host, port = listener.getsockname()[:2]
        joins = [a.join.remote(f"{host}:{port}", self.max_bytes, self.one_machine) for a in self.actors]
        join_as_rank_zero(self.world_size, listener, device)
        self.joined = True
        blocks = settle_group(model, self.parallel, 0, device, self.max_bytes, self.one_machine, self.check,
                              capacity)
        ray.get(joins)
        return blocks

    def send(self, delta: Any) -> None:
        import ray

        try:  # the step launched P steps ago, done on every rank (it met rank 0 in its collectives)
            while len(self.pending) >= self.depth:
                ray.get(self.pending[0])
                self.pending.popleft()
        except Exception as e:  # noqa: BLE001 (an actor died: named by check)
            self.check()
            raise WorkerDiedError(f"a worker rank on Ray failed: {type(_cause(e)).__name__}") from None
        self.pending.append([a.execute.remote(delta) for a in self.actors])

    def check(self) -> None:
        import ray

        for step in self.pending:
            for rank, ref in enumerate(step, start=1):
                ready, _ = ray.wait([ref], timeout=0)
                if ready:
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 (named, with the rank)
                        raise WorkerDiedError(f"{rank_name(self.parallel, rank)} (Ray actor) died: "
                                              f"{type(_cause(e)).__name__}") from None

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.joined:
            try:
                ray.get([a.close.remote() for a in self.actors], timeout=10)
            except Exception:  # noqa: BLE001 (a dead actor has nothing to close)
                pass
            if dist.is_initialized():
                dist.destroy_process_group()
            self.joined = False
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        remove_placement_group(self.pg)
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
