"""The Ray Serve application of `llmscale cluster serve`: an ingress speaking the OpenAI API
(serve/app.py's, in front of a `ClusterEngineClient`) and the engine replicas behind it.

`build_app` decides the deployments' options once: replica count (fixed, or autoscaled to the
SLO by `cluster/autoscale.py`) and CPUs, how many requests a replica takes, the router class,
how often replicas report their state to it, the optional fallback deployment, and that the
ingress takes no CPU of its own (it only tokenizes and forwards; the replicas compute).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.actor import ActorHandle
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from llmscale.cluster.autoscale import AutoscalingOptions
from llmscale.cluster.board import FALLBACK, LIVE_STATES, NAMESPACE, REPORT_PERIOD_S, ready_main_replicas
from llmscale.cluster.client import ClusterEngineClient
from llmscale.cluster.replica import EngineReplica
from llmscale.cluster.routing import ROUTERS
from llmscale.config import EngineConfig
from llmscale.engine.llm_engine import EngineState
from llmscale.model.loader import read_model_config
from llmscale.model.lookup import resolve_model
from llmscale.model.tokenizer import Tokenizer
from llmscale.serve.app import create_app
from llmscale.serve.cost import CostModel
from llmscale.serve.metrics import AutoscalerCollector

ROUTING_STATS_PERIOD_S = 1.0  # Serve's default (10 s) leaves the router balancing on stale load
STATE_FIELDS = tuple(EngineState.__dataclass_fields__)
ONGOING_PER_SEQ = 2  # requests a replica takes per sequence it batches
INGRESS_MAX_ONGOING = 100_000


@dataclass(frozen=True)
class ApiOptions:
    """The `llmscale serve` flags the ingress applies, meaning what they mean there."""

    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int = 1024
    max_n: int = 128
    max_body_bytes: int = 8 << 20
    cost: CostModel | None = None
    slo_ms: tuple[float, float] | None = None  # (TTFT, TPOT) targets to count requests against


class Ingress:
    """The OpenAI API for the whole cluster, plus `/cluster/status` (the board's snapshot and the
    SLO attainment of the requests served, when there are targets)."""

    def __init__(self, replicas: DeploymentHandle, board: ActorHandle, config: EngineConfig,
                 api: ApiOptions, fallback: DeploymentHandle | None = None) -> None:
        path = resolve_model(config.model, config.keep_quantized)
        max_model_len = read_model_config(path).context_len(config.max_model_len)
        self.board = board
        self.api = api
        self.replicas: list[dict[str, Any]] = []  # the board's last snapshot
        self.autoscaler: dict[str, Any] | None = None
        self.client = ClusterEngineClient(replicas, Tokenizer.from_folder(path), config.model_name,
                                          max_model_len, self.states, fallback, self.main_ready)

    async def _poll_board(self) -> None:
        while True:
            snapshot = await self.board.snapshot.remote()
            self.replicas, self.server.draining = snapshot["replicas"], snapshot["draining"]
            self.autoscaler = snapshot["autoscaler"]
            await asyncio.sleep(REPORT_PERIOD_S)

    def main_ready(self) -> bool:
        """Whether a replica of the main model was ready at the board's last snapshot."""
        return ready_main_replicas(self.replicas) > 0

    def states(self) -> dict[str, EngineState]:
        return {r["replica_id"]: EngineState(**{f: r[f] for f in STATE_FIELDS})
                for r in self.replicas if r["state"] in LIVE_STATES}

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = self.api
        app = create_app(self.client, api.served_model_name, api.api_key, api.max_queue, api.cost,
                         max_n=api.max_n, max_body_bytes=api.max_body_bytes, replica_metrics=True)
        self.server = app.state.server
        self.server.metrics.registry.register(
            AutoscalerCollector(lambda: self.autoscaler, self.server.model_name))
        if api.slo_ms is not None:
            self.server.metrics.track_slo(api.slo_ms[0] / 1e3, api.slo_ms[1] / 1e3)
        self.poll = asyncio.get_event_loop().create_task(self._poll_board())

        @app.get("/cluster/status")
        async def status() -> dict[str, Any]:
            snapshot = await self.board.snapshot.remote()
            return {"model": self.server.model_name, **snapshot, "slo": self.server.metrics.slo_attainment()}

        return app


def build_app(config: EngineConfig, board: ActorHandle, num_replicas: int, replica_cpus: float,
              router: str, api: ApiOptions, drain_timeout_s: float = 30.0,
              autoscaling: AutoscalingOptions | None = None, board_name: str = "",
              fallback: EngineConfig | None = None) -> Application:
    """`drain_timeout_s`: how long a replica being stopped lets its requests finish. With
    `autoscaling` the replica count follows the SLO between its bounds instead of
    `num_replicas`; its policy reports to the board named `board_name`. `fallback`: the model
    of one always-warm replica that answers while the main deployment has none ready; it
    reserves no CPU, so it never keeps a main replica from starting (it computes only when
    they are cold)."""
    count: dict[str, Any] = {"num_replicas": num_replicas}
    if autoscaling is not None:
        count = {"autoscaling_config": autoscaling.serve_config(board_name, NAMESPACE)}
    replica = serve.deployment(EngineReplica).options(
        name="engine", **count, ray_actor_options={"num_cpus": replica_cpus},
        # An engine batches up to max_num_seqs and queues the rest where the scheduler, the
        # router and the autoscaler see them; Serve's default (5) would queue at the handles.
        max_ongoing_requests=ONGOING_PER_SEQ * config.scheduler.max_num_seqs,
        graceful_shutdown_timeout_s=drain_timeout_s,
        request_router_config=RequestRouterConfig(
            request_router_class=_import_path(ROUTERS[router]),
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S))
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        # Admission is the API's own (--max-queue answers 503); Serve's default cap (5) would
        # hold every request past the fifth at the proxy, /cluster/status included.
        max_ongoing_requests=INGRESS_MAX_ONGOING, graceful_shutdown_timeout_s=drain_timeout_s)
    standby = None
    if fallback is not None:
        standby = serve.deployment(EngineReplica).options(
            name="fallback", num_replicas=1, ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=ONGOING_PER_SEQ * fallback.scheduler.max_num_seqs,
            graceful_shutdown_timeout_s=drain_timeout_s).bind(fallback, board, FALLBACK)
    return ingress.bind(replica.bind(config, board), board, config, api, standby)


def _import_path(cls: type) -> str:
    """Serve imports a router given by path; a class object it pickles by value, and that copy's
    `ReplicaRequest` would not be the one the ingress sends (isinstance fails)."""
    return f"{cls.__module__}.{cls.__qualname__}"
