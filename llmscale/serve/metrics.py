"""Prometheus metrics, named like vLLM's (`llmscale:` prefix) so its dashboards carry over.

Gauges are read from the engine when Prometheus scrapes (no polling thread); counters and
histograms are fed by the server as requests finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmscale.engine.llm_engine import EngineState
from llmscale.engine.outputs import RequestOutput

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


# EngineState field -> (metric type, name, help), named like vLLM's.
_STATE_METRICS: dict[str, tuple[type, str, str]] = {
    "running": (GaugeMetricFamily, "llmscale:num_requests_running", "Requests running in the engine"),
    "waiting": (GaugeMetricFamily, "llmscale:num_requests_waiting", "Requests waiting to be scheduled"),
    "kv_usage": (GaugeMetricFamily, "llmscale:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)"),
    "prefix_hit_rate": (GaugeMetricFamily, "llmscale:prefix_cache_hit_rate",
                        "Fraction of looked-up prompt tokens found in the prefix cache"),
    "num_preemptions": (CounterMetricFamily, "llmscale:num_preemptions", "Preemptions since start"),
}


class _EngineCollector(Collector):
    """Each engine's state as gauges, read when Prometheus scrapes (values may be a step stale).
    Several engines (a cluster's replicas) are told apart by a `replica` label."""

    def __init__(self, states: Callable[[], dict[str, EngineState]], labels: dict[str, str],
                 per_replica: bool) -> None:
        self.states = states
        self.labels = labels
        self.names = [*labels, "replica"] if per_replica else list(labels)

    def collect(self) -> Iterator[Any]:
        families = {field: kind(name, doc, labels=self.names)
                    for field, (kind, name, doc) in _STATE_METRICS.items()}
        for replica, state in sorted(self.states().items()):
            values = [*self.labels.values(), replica][:len(self.names)]
            for field, family in families.items():
                family.add_metric(values, getattr(state, field))
        yield from families.values()


class AutoscalerCollector(Collector):
    """A cluster's autoscaler (the status board's `autoscaler` section): replicas wanted and
    ready, and its decisions counted by the signal that made them."""

    def __init__(self, autoscaler: Callable[[], dict[str, Any] | None], model_name: str) -> None:
        self.autoscaler = autoscaler
        self.model_name = model_name

    def collect(self) -> Iterator[Any]:
        a = self.autoscaler()
        if a is None:
            return
        labels = ["model_name"]
        for key, name, doc in (("desired_replicas", "llmscale:autoscaler_desired_replicas",
                                "Engine replicas the autoscaler wants"),
                               ("ready_replicas", "llmscale:autoscaler_ready_replicas",
                                "Engine replicas ready to serve")):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self.model_name], a[key])
            yield family
        decisions = CounterMetricFamily("llmscale:autoscaler_decisions",
                                        "Changes of the replica count the autoscaler wants, by signal",
                                        labels=[*labels, "signal"])
        for signal, count in sorted(a["by_signal"].items()):
            decisions.add_metric([self.model_name, signal], count)
        yield decisions


class ServerMetrics:
    def __init__(self, states: Callable[[], dict[str, EngineState]], model_name: str,
                 per_replica: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.slo: tuple[float, float] | None = None  # (TTFT s, TPOT s) with `track_slo`
        self.slo_counts = {"true": 0, "false": 0}
        labels = {"model_name": model_name}
        self.registry.register(_EngineCollector(states, labels, per_replica))
        names = list(labels)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, names, buckets=buckets, registry=self.registry).labels(**labels)

        self.prompt_tokens = counter("llmscale:prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("llmscale:generation_tokens", "Generated tokens")
        self.cost_usd = counter("llmscale:request_cost_usd", "Cost of finished requests in USD")
        self.ttft = histogram("llmscale:time_to_first_token_seconds", "Time to first token",
                              _LATENCY_BUCKETS_S)
        self.tpot = histogram("llmscale:time_per_output_token_seconds",
                              "Mean time per output token after the first", _TPOT_BUCKETS_S)
        self.e2e = histogram("llmscale:e2e_request_latency_seconds", "End-to-end request latency",
                             _LATENCY_BUCKETS_S)
        self.queue = histogram("llmscale:request_queue_time_seconds",
                               "Time from arrival to first scheduled", _LATENCY_BUCKETS_S)

    def track_slo(self, ttft_s: float, tpot_s: float) -> None:
        """Count finished requests against these targets, as the server saw them (time to the
        first token reaching it, and the mean gap after): `llmscale:slo_requests_total{met}`."""
        self.slo = (ttft_s, tpot_s)
        self.slo_requests = Counter("llmscale:slo_requests", "Finished requests, by whether they met the SLO",
                                    ["model_name", "met"], registry=self.registry)

    def slo_attainment(self) -> dict[str, Any] | None:
        if self.slo is None:
            return None
        met, missed = self.slo_counts["true"], self.slo_counts["false"]
        return {"ttft_ms": self.slo[0] * 1e3, "tpot_ms": self.slo[1] * 1e3, "met": met, "missed": missed,
                "attainment": met / (met + missed) if met + missed else None}

    def observe(self, out: RequestOutput, prompt_tokens: int, completion_tokens: int, cost_usd: float,
                e2e_s: float, ttft_s: float | None = None) -> None:
        """`ttft_s`: until the first token reached the server (counted against the SLO)."""
        if self.slo is not None and ttft_s is not None:
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            tpot_s = (e2e_s - ttft_s) / (n - 1) if n > 1 else 0.0
            met = "true" if ttft_s <= self.slo[0] and tpot_s <= self.slo[1] else "false"
            self.slo_counts[met] += 1
            self.slo_requests.labels(model_name=self.model_name, met=met).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.cost_usd.inc(cost_usd)
        self.e2e.observe(e2e_s)
        m = out.metrics
        if m is None:
            return
        if m.first_scheduled_s is not None:
            self.queue.observe(m.first_scheduled_s - m.arrival_s)
        if m.first_token_s is not None:
            self.ttft.observe(m.first_token_s - m.arrival_s)
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            if m.last_token_s is not None and n > 1:
                self.tpot.observe((m.last_token_s - m.first_token_s) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
