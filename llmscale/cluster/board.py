"""`StatusBoard`: a Ray actor where every engine replica reports who and where it is and what
its engine is doing, once a second; the ingress reads it for `/cluster/status` and `/metrics`.

Routing does not read it: the router takes the same state through Serve's routing-stats hook.
A replica reports `starting` before its engine loads, `ready` after, `draining` when Serve
stops it; one not heard from for `DEAD_AFTER_S` is shown `dead` until a replacement (same
replica id, new process) reports. `drain` marks the whole cluster as shutting down.
"""

from __future__ import annotations

import time
from typing import Any

import ray

REPORT_PERIOD_S = 1.0
DEAD_AFTER_S = 4 * REPORT_PERIOD_S  # a missed report or two is a busy replica, not a dead one


@ray.remote(num_cpus=0)
class StatusBoard:
    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}
        self.draining = False
        self.failure: str | None = None

    def report(self, stats: dict[str, Any]) -> None:
        self.reports[stats["replica_id"]] = {**stats, "reported_s": time.time()}

    def report_failure(self, message: str) -> None:
        """A replica could not start (a user error: the engine's one-line `ConfigError`)."""
        self.failure = message

    def start_failure(self) -> str | None:
        return self.failure

    def drain(self) -> None:
        """The cluster is shutting down: the ingress answers new requests with 503."""
        self.draining = True

    def snapshot(self) -> dict[str, Any]:
        """{"draining": bool, "replicas": every replica ever reported, by id, its state `dead`
        when it went silent}."""
        now = time.time()
        replicas = [{**r, "state": "dead"} if now - r["reported_s"] > DEAD_AFTER_S else r
                    for _, r in sorted(self.reports.items())]
        return {"draining": self.draining, "replicas": replicas}
