"""`EngineReplica`: one `AsyncLLMEngine` as a Ray Serve replica.

The ingress calls `generate` with a `ReplicaRequest` (token ids already known, so the router
can match prefixes) and streams back the engine's outputs, each tagged with the replica's
stable id (`replica-<rank>`: a replacement takes its predecessor's rank). The replica's
engine state reaches the router through Serve's routing-stats hook, the autoscaler (with its
recent latencies) through Serve's autoscaling-stats hook, and the `StatusBoard` (for
`/cluster/status` and `/metrics`) through a report once a second.
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

from llmscale.cluster.autoscale import TPOT_SAMPLE_TOKENS, LatencyWindow, StepWindow
from llmscale.cluster.board import ENGINE, FALLBACK, REPORT_PERIOD_S
from llmscale.cluster.routing import ReplicaRequest
from llmscale.config import ConfigError, EngineConfig
from llmscale.engine.async_engine import AsyncLLMEngine
from llmscale.engine.llm_engine import EngineState
from llmscale.engine.outputs import RequestOutput


def process_start_time() -> float:
    """When this process started, in seconds since the epoch: /proc gives it in clock ticks
    since boot, set against the boot clock now (the boot time /proc/stat gives is whole seconds)."""
    with open("/proc/self/stat") as f:
        ticks_since_boot = int(f.read().rsplit(")", 1)[1].split()[19])
    age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks_since_boot / os.sysconf("SC_CLK_TCK")
    return time.time() - age_s


IDLE = EngineState(running=0, waiting=0, kv_usage=0.0, prefix_hit_rate=0.0, num_preemptions=0,
                   requests_served=0)


class EngineReplica:
    """Deployed by `cluster.app.build_app`, which sets the replica count, CPUs and router.
    `role`: `engine` for the main model's replicas, or `fallback` for the one replica of the
    model that answers while the main one has none ready (its outputs name their model)."""

    def __init__(self, config: EngineConfig, board: ActorHandle, role: str = ENGINE) -> None:
        init_start_s = time.time()
        self.role = role
        self.replica_id = f"replica-{serve.get_replica_context().rank.rank}" if role == ENGINE else role
        self.served_model = config.model_name if role == FALLBACK else None
        self.node = ray.get_runtime_context().get_node_id()
        self.board = board
        self.state = "starting"
        self.engine: AsyncLLMEngine | None = None
        self.startup: dict[str, Any] | None = None
        self.latencies = LatencyWindow()
        self.steps = StepWindow()
        self.board.report.remote(self.describe())
        try:
            self.engine = AsyncLLMEngine.from_config(config)
        except ConfigError as e:  # the command reports it in one line; Serve would dump a traceback
            ray.get(self.board.report_failure.remote(str(e)))
            raise
        self.state = "ready"
        # Where this replica's start went: `llmscale cluster coldstart` lays it out.
        self.startup = {"process_start_s": process_start_time(), "init_start_s": init_start_s,
                        "ready_s": time.time(), "engine_phases": self.engine.engine.startup_phases}
        threading.Thread(target=self._report_loop, name="llmscale-report", daemon=True).start()

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[RequestOutput | ConfigError]:
        """The engine's outputs; a request the engine refuses yields its `ConfigError` instead:
        a refusal is an answer (400), and raised, Serve would log it as this replica failing."""
        assert self.engine is not None
        prompt = {"prompt": request.prompt_text, "prompt_token_ids": request.prompt_token_ids}
        sampled = 0  # tokens of this request already in a latency sample
        try:
            async for out in self.engine.generate(prompt, request.params, request.request_id):
                out.served_by, out.served_model = self.replica_id, self.served_model
                sampled = self._sample_latency(out, sampled)
                yield out
        except ConfigError as e:
            yield e

    def _sample_latency(self, out: RequestOutput, sampled: int) -> int:
        """Feed the autoscaler's latency window from a request's output so far: its TTFT at the
        first token, its TPOT every TPOT_SAMPLE_TOKENS tokens and at the end. Returns the
        tokens sampled."""
        m = out.metrics
        n = len(out.outputs[0].token_ids) if out.outputs else 0
        if m is None or m.first_token_s is None or n == 0:
            return sampled
        if sampled == 0:
            self.latencies.add_ttft(m.first_token_s - m.arrival_s)
            sampled = 1
        if n > 1 and m.last_token_s is not None and (n - sampled >= TPOT_SAMPLE_TOKENS or out.finished):
            self.latencies.add_tpot((m.last_token_s - m.first_token_s) / (n - 1))
            sampled = n
        return sampled

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the SLO autoscaler (`cluster/autoscale.py`) decides on; latencies only when the
        window holds samples, the mean decode step (`StepWindow`) only when the engine made one lately
        (Serve calls this every `METRICS_INTERVAL_S`)."""
        engine_state = self.engine.engine.state() if self.engine is not None else IDLE
        stats = {"running": float(engine_state.running), "waiting": float(engine_state.waiting),
                 "kv_usage": engine_state.kv_usage}
        ttft, tpot = self.latencies.p90()
        if ttft is not None:
            stats["ttft_p90_s"] = ttft
        if tpot is not None:
            stats["tpot_p90_s"] = tpot
        if self.engine is not None:  # the mean decode step of the last seconds: the TPOT of now
            counters = self.engine.engine.stats
            step = self.steps.mean_step(counters["decode_steps"], counters["decode_step_s"])
            if step is not None:
                stats["step_s"] = step
        return stats

    async def wake(self) -> None:
        """Nothing: a call that waits for a replica, so a deployment at zero starts one (the
        ingress sends it while the fallback answers in the main model's place)."""

    def describe(self) -> dict[str, Any]:
        """Who and where this replica is, and what its engine is doing."""
        engine_state = self.engine.engine.state() if self.engine is not None else IDLE
        return {"replica_id": self.replica_id, "role": self.role, "state": self.state, "node": self.node,
                "pid": os.getpid(), "startup": self.startup, **asdict(engine_state)}

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
        self.state = "stopped"
        self.board.report.remote(self.describe())
