"""The Ray Serve application of `llmscale cluster serve`: an ingress speaking the OpenAI API
(serve/app.py's, in front of a `ClusterEngineClient`) and the engine replicas behind it.

`build_app` decides the deployments' options once: replica count and CPUs, the router class,
how often replicas report their state to it, and that the ingress takes no CPU of its own
(it only tokenizes and forwards; the replicas compute).
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

from llmscale.cluster.board import REPORT_PERIOD_S
from llmscale.cluster.client import ClusterEngineClient
from llmscale.cluster.replica import EngineReplica
from llmscale.cluster.routing import ROUTERS
from llmscale.config import EngineConfig
from llmscale.engine.llm_engine import EngineState
from llmscale.model.gguf_loader import resolve_model
from llmscale.model.loader import read_model_config
from llmscale.model.tokenizer import Tokenizer
from llmscale.serve.app import create_app
from llmscale.serve.cost import CostModel

ROUTING_STATS_PERIOD_S = 1.0  # Serve's default (10 s) leaves the router balancing on stale load
STATE_FIELDS = tuple(EngineState.__dataclass_fields__)


@dataclass(frozen=True)
class ApiOptions:
    """The `llmscale serve` flags the ingress applies, meaning what they mean there."""

    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int = 1024
    max_n: int = 128
    max_body_bytes: int = 8 << 20
    cost: CostModel | None = None


class Ingress:
    """The OpenAI API for the whole cluster, plus `/cluster/status`."""

    def __init__(self, replicas: DeploymentHandle, board: ActorHandle, config: EngineConfig,
                 api: ApiOptions) -> None:
        path = resolve_model(config.model, config.keep_quantized)
        max_model_len = read_model_config(path).context_len(config.max_model_len)
        self.board = board
        self.api = api
        self.replicas: list[dict[str, Any]] = []  # the board's last snapshot
        self.client = ClusterEngineClient(replicas, Tokenizer.from_folder(path), config.model_name,
                                          max_model_len, self.states)

    async def _poll_board(self) -> None:
        while True:
            snapshot = await self.board.snapshot.remote()
            self.replicas, self.server.draining = snapshot["replicas"], snapshot["draining"]
            await asyncio.sleep(REPORT_PERIOD_S)

    def states(self) -> dict[str, EngineState]:
        return {r["replica_id"]: EngineState(**{f: r[f] for f in STATE_FIELDS})
                for r in self.replicas if r["state"] != "dead"}

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = self.api
        app = create_app(self.client, api.served_model_name, api.api_key, api.max_queue, api.cost,
                         max_n=api.max_n, max_body_bytes=api.max_body_bytes, replica_metrics=True)
        self.server = app.state.server
        self.poll = asyncio.get_event_loop().create_task(self._poll_board())

        @app.get("/cluster/status")
        async def status() -> dict[str, Any]:
            snapshot = await self.board.snapshot.remote()
            return {"model": self.server.model_name, **snapshot}

        return app


def build_app(config: EngineConfig, board: ActorHandle, num_replicas: int, replica_cpus: float,
              router: str, api: ApiOptions, drain_timeout_s: float = 30.0) -> Application:
    """`drain_timeout_s`: how long a replica being stopped lets its requests finish."""
    replica = serve.deployment(EngineReplica).options(
        name="engine", num_replicas=num_replicas, ray_actor_options={"num_cpus": replica_cpus},
        graceful_shutdown_timeout_s=drain_timeout_s,
        request_router_config=RequestRouterConfig(
            request_router_class=_import_path(ROUTERS[router]),
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S))
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=drain_timeout_s)
    return ingress.bind(replica.bind(config, board), board, config, api)


def _import_path(cls: type) -> str:
    """Serve imports a router given by path; a class object it pickles by value, and that copy's
    `ReplicaRequest` would not be the one the ingress sends (isinstance fails)."""
    return f"{cls.__module__}.{cls.__qualname__}"
