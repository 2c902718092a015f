"""`StatusBoard`: a Ray actor where every engine replica reports who and where it is and what
its engine is doing, once a second; the ingress reads it for `/cluster/status` and `/metrics`.

Routing does not read it: the router takes the same state through Serve's routing-stats hook.
A replica reports `starting` before its engine loads, `ready` after, `draining` when Serve
stops it and `stopped` once its engine is down (the autoscaler removed it); one not heard
from for `DEAD_AFTER_S` otherwise is shown `dead` until a replacement (same replica id, new
process) reports. `drain` marks the whole cluster as shutting down.

The autoscaling policy (`cluster/autoscale.py`), which runs in Serve's controller, finds the
board by name and records each change of the replica count it wants, with its reason. The
board also adds up replica-seconds per role from the reports (what the deployment cost).
"""

from __future__ import annotations

import time
from typing import Any

import ray

REPORT_PERIOD_S = 1.0
DEAD_AFTER_S = 4 * REPORT_PERIOD_S  # a missed report or two is a busy replica, not a dead one
NAMESPACE = "llmscale"  # where the board is named, for the autoscaling policy to find it
DECISIONS_KEPT = 200
# States in which a replica holds its CPUs and memory, and has an engine state worth exporting.
LIVE_STATES = ("starting", "ready", "draining")
ENGINE, FALLBACK = "engine", "fallback"  # replica roles: the main model's, and the fallback's


def ready_main_replicas(replicas: list[dict[str, Any]]) -> int:
    """How many replicas of the main model a snapshot's `replicas` shows ready."""
    return sum(1 for r in replicas if r["state"] == "ready" and r["role"] == ENGINE)


@ray.remote(num_cpus=0)
class StatusBoard:
    def __init__(self, autoscaling: dict[str, Any] | None = None, cost_per_replica_hour: float | None = None
                 ) -> None:
        """`autoscaling`: the bounds and targets when the replica count follows the SLO.
        `cost_per_replica_hour`: what a replica's hour costs (`--hardware-cost-per-hour`)."""
        self.autoscaling = autoscaling
        self.cost_per_replica_hour = cost_per_replica_hour
        self.replica_seconds: dict[str, float] = {}  # by role: time replicas held their resources
        self.reports: dict[str, dict[str, Any]] = {}
        self.draining = False
        self.failure: str | None = None
        self.decisions: list[dict[str, Any]] = []  # the autoscaler's, oldest first
        self.decision_count = 0
        self.by_signal: dict[str, int] = {}  # decisions per signal that made them

    def report(self, stats: dict[str, Any]) -> None:
        now = time.time()
        previous = self.reports.get(stats["replica_id"])
        if previous is not None and previous["state"] in LIVE_STATES and previous["pid"] == stats["pid"]:
            # Since the last report, capped: a replica silent longer was dead or gone meanwhile.
            held = min(now - previous["reported_s"], DEAD_AFTER_S)
            self.replica_seconds[stats["role"]] = self.replica_seconds.get(stats["role"], 0.0) + held
        self.reports[stats["replica_id"]] = {**stats, "reported_s": now}

    def report_failure(self, message: str) -> None:
        """A replica could not start (a user error: the engine's one-line `ConfigError`)."""
        self.failure = message

    def start_failure(self) -> str | None:
        return self.failure

    def record_decision(self, decision: dict[str, Any]) -> None:
        """The autoscaler changed the replica count it wants (`autoscale.Decision` fields, plus
        `previous`, `running_replicas` and `time_s`)."""
        self.decision_count += 1
        self.by_signal[decision["signal"]] = self.by_signal.get(decision["signal"], 0) + 1
        self.decisions = [*self.decisions[-(DECISIONS_KEPT - 1):], {**decision, "index": self.decision_count}]

    def decisions_since(self, index: int) -> list[dict[str, Any]]:
        return [d for d in self.decisions if d["index"] > index]

    def drain(self) -> None:
        """The cluster is shutting down: the ingress answers new requests with 503."""
        self.draining = True

    def snapshot(self) -> dict[str, Any]:
        """{"draining": bool, "replicas": every replica ever reported, by id, its state `dead`
        when it went silent without being stopped, "autoscaler": bounds, targets, the replicas
        wanted and ready, the last decision and how many were made (None without autoscaling),
        "spent": replica-seconds by role and their cost (None without a price)}."""
        now = time.time()
        replicas = [{**r, "state": "dead"} if now - r["reported_s"] > DEAD_AFTER_S and r["state"] != "stopped"
                    else r for _, r in sorted(self.reports.items())]
        autoscaler = None
        if self.autoscaling is not None:
            last = self.decisions[-1] if self.decisions else None
            autoscaler = {**self.autoscaling, "decisions": self.decision_count,
                          "by_signal": dict(self.by_signal), "last_decision": last,
                          "desired_replicas": last["replicas"] if last else self.autoscaling["min_replicas"],
                          "ready_replicas": ready_main_replicas(replicas)}
        spent = {"replica_seconds": dict(self.replica_seconds), "cost_usd": None}
        if self.cost_per_replica_hour is not None:
            spent["cost_usd"] = sum(self.replica_seconds.values()) / 3600 * self.cost_per_replica_hour
        return {"draining": self.draining, "replicas": replicas, "autoscaler": autoscaler, "spent": spent}
