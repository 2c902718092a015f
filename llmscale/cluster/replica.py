"""`EngineReplica`: one `AsyncLLMEngine` as a Ray Serve replica.

The ingress calls `generate` with a `ReplicaRequest` (token ids already known, so the router
can match prefixes) and streams back the engine's outputs, each tagged with the replica's
stable id (`replica-<rank>`: a replacement takes its predecessor's rank). The replica's
engine state reaches the router through Serve's routing-stats hook, and the `StatusBoard`
(for `/cluster/status` and `/metrics`) through a report once a second.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import ray
from ray import serve
from ray.actor import ActorHandle

from llmscale.cluster.board import REPORT_PERIOD_S
from llmscale.cluster.routing import ReplicaRequest
from llmscale.config import ConfigError, EngineConfig
from llmscale.engine.async_engine import AsyncLLMEngine
from llmscale.engine.llm_engine import EngineState
from llmscale.engine.outputs import RequestOutput

IDLE = EngineState(running=0, waiting=0, kv_usage=0.0, prefix_hit_rate=0.0, num_preemptions=0,
                   requests_served=0)


class EngineReplica:
    """Deployed by `cluster.app.build_app`, which sets the replica count, CPUs and router."""

    def __init__(self, config: EngineConfig, board: ActorHandle) -> None:
        self.replica_id = f"replica-{serve.get_replica_context().rank.rank}"
        self.node = ray.get_runtime_context().get_node_id()
        self.board = board
        self.state = "starting"
        self.engine: AsyncLLMEngine | None = None
        self.board.report.remote(self.describe())
        try:
            self.engine = AsyncLLMEngine.from_config(config)
        except ConfigError as e:  # the command reports it in one line; Serve would dump a traceback
            ray.get(self.board.report_failure.remote(str(e)))
            raise
        self.state = "ready"
        threading.Thread(target=self._report_loop, name="llmscale-report", daemon=True).start()

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[RequestOutput | ConfigError]:
        """The engine's outputs; a request the engine refuses yields its `ConfigError` instead:
        a refusal is an answer (400), and raised, Serve would log it as this replica failing."""
        assert self.engine is not None
        prompt = {"prompt": request.prompt_text, "prompt_token_ids": request.prompt_token_ids}
        try:
            async for out in self.engine.generate(prompt, request.params, request.request_id):
                out.served_by = self.replica_id
                yield out
        except ConfigError as e:
            yield e

    def describe(self) -> dict[str, Any]:
        """Who and where this replica is, and what its engine is doing."""
        engine_state = self.engine.engine.state() if self.engine is not None else IDLE
        return {"replica_id": self.replica_id, "state": self.state, "node": self.node, "pid": os.getpid(),
                **asdict(engine_state)}

    def record_routing_stats(self) -> dict[str, Any]:
        return self.describe()

    def check_health(self) -> None:
        """Serve replaces a replica whose engine loop died."""
        if self.engine is None or not self.engine.is_running:
            raise RuntimeError(f"{self.replica_id}: engine loop is not running")

    def _report_loop(self) -> None:
        while self.state == "ready":
            self.board.report.remote(self.describe())
            time.sleep(REPORT_PERIOD_S)

    def __del__(self) -> None:
        """Serve stops the replica: its requests have drained (or timed out)."""
        self.state = "draining"
        self.board.report.remote(self.describe())
        if self.engine is not None:
            self.engine.shutdown()
