"""From a model, traffic and latency targets (and a budget) to a configuration and its cost.

For every candidate replica (hardware, weight format, tensor and pipeline parallelism, then
the batch limits of the best few), the simulator finds its goodput: the highest Poisson
request rate whose p99 TTFT and p99 TPOT stay within the SLO (bisection between nothing and
the rate it saturates at). The target rate then needs ceil(rate / goodput) replicas, which is
checked once more by simulating them behind the router. Candidates are ranked by cost per
hour; the Pareto frontier over cost per 1M output tokens, p99 TTFT and goodput per replica is
kept for the plot. `replicas_needed` is the same computation for one deployment, for an
autoscaler that asks how many replicas the traffic it sees needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from llmscale.bench.metrics import Run, parse_slo, summarize
from llmscale.config import ConfigError
from llmscale.plan.calibrate import Calibration
from llmscale.plan.deployment import THIS_MACHINE, Deployment, ModelSpec
from llmscale.plan.hardware import Hardware
from llmscale.plan.simulator import (
    CATALOGUE_REQUEST_OVERHEAD,
    RequestOverhead,
    SimWorkload,
    make_router,
    simulate,
)

SLO_KEYS = ("ttft_p99_ms", "tpot_p99_ms")
GPU_FORMATS = ("bf16", "fp8", "int8", "int4")
CPU_FORMATS = ("bf16", "int8", "int4")
TP_SIZES = (1, 2, 4, 8)
PP_SIZES = (1, 2, 4)  # stages on separate nodes, for models a node cannot hold
# The engine's batch limits tried for the best few candidates: (max_num_seqs, tokens per step).
GPU_BATCH_LIMITS = ((256, 2048), (64, 2048), (256, 8192))
CPU_BATCH_LIMITS = ((128, 512), (32, 256), (128, 1024))
REFINED = 3  # candidates whose batch limits are searched
BISECTION_STEPS = 6
MAX_REPLICAS = 256


@dataclass(frozen=True)
class Slo:
    ttft_p99_ms: float = math.inf
    tpot_p99_ms: float = math.inf

    @classmethod
    def parse(cls, spec: str) -> Slo:
        """'ttft_p99_ms=500,tpot_p99_ms=50' (either may be left out, not both)."""
        values = parse_slo(spec, SLO_KEYS)
        if not values:
            raise ConfigError(f"--slo: give at least one of {', '.join(SLO_KEYS)}")
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{k}={getattr(self, k):g}" for k in SLO_KEYS if math.isfinite(getattr(self, k)))


@dataclass(frozen=True)
class Latency:
    """p99s of one simulated run, and what it delivered."""

    ttft_p99_ms: float
    tpot_p99_ms: float
    output_tokens_per_s: float
    requests_per_s: float

    @classmethod
    def of(cls, run: Run) -> Latency:
        """From bench's summary; no first token at all misses any TTFT target, and no second
        token (one-token outputs) meets any TPOT target, as in bench's goodput."""
        s = summarize(run)
        ttft, tpot = s["ttft_ms"]["p99"], s["tpot_ms"]["p99"]
        return cls(math.inf if math.isnan(ttft) else ttft, 0.0 if math.isnan(tpot) else tpot,
                   s["output_throughput"], s["request_throughput"])

    def meets(self, slo: Slo) -> bool:
        return self.ttft_p99_ms <= slo.ttft_p99_ms and self.tpot_p99_ms <= slo.tpot_p99_ms

    def binding(self, slo: Slo) -> str:
        """Which target this run misses by the larger factor (the one that binds)."""
        ttft = self.ttft_p99_ms / slo.ttft_p99_ms
        tpot = self.tpot_p99_ms / slo.tpot_p99_ms
        return "TTFT p99" if ttft >= tpot else "TPOT p99"


@dataclass(frozen=True)
class Workload:
    """Requests drawn once and replayed for every candidate: (prompt ids, output tokens)."""

    prompts: list[list[int]]
    max_tokens: list[int]
    seed: int = 0

    def at_rate(self, rate: float, n: int | None = None) -> SimWorkload:
        from llmscale.bench.arrivals import arrival_times

        n = n or len(self.prompts)
        prompts = [self.prompts[i % len(self.prompts)] for i in range(n)]
        tokens = [self.max_tokens[i % len(self.max_tokens)] for i in range(n)]
        return SimWorkload(prompts, tokens, arrival_times(n, rate, 1.0, self.seed))

    @property
    def mean_output_tokens(self) -> float:
        return sum(self.max_tokens) / len(self.max_tokens)


@dataclass(frozen=True)
class Evaluation:
    deployment: Deployment  # with the replicas the target rate needs
    goodput: float  # req/s one replica sustains within the SLO
    saturation: float  # req/s one replica completes when flooded
    binding: str  # what limits a replica's goodput: "TTFT p99", "TPOT p99" or "throughput"
    at_target: Latency  # the whole deployment at the target rate
    cost_per_million: float  # USD per 1M output tokens at the target rate

    @property
    def cost_per_hour(self) -> float:
        return self.deployment.cost_per_hour


@dataclass(frozen=True)
class Rejected:
    deployment: Deployment
    reason: str
    light_load: Latency | None = None  # when the SLO fails even nearly idle


class Simulator:
    """Simulates candidate deployments on one model and workload."""

    def __init__(self, model: ModelSpec, workload: Workload, max_model_len: int,
                 calibration: Calibration | None = None, routing: str = "pow2",
                 request_overhead: RequestOverhead = CATALOGUE_REQUEST_OVERHEAD) -> None:
        self.model = model
        self.workload = workload
        self.max_model_len = max_model_len
        self.calibration = calibration
        self.routing = routing
        self.request_overhead = request_overhead

    def run(self, deployment: Deployment, rate: float, n: int | None = None) -> Latency:
        make = deployment.engine_factory(self.model, self.max_model_len, self.calibration)
        work = self.workload.at_rate(rate, n)
        route = make_router(self.routing, self.workload.seed)
        run = simulate(make, deployment.replicas, work, route, "plan", rate, 1.0, self.workload.seed,
                       request_overhead=self.request_overhead)
        return Latency.of(run)

    def goodput(self, deployment: Deployment, slo: Slo) -> tuple[float, float, str, Latency | None]:
        """(goodput, saturation rate, what binds, the light-load latency if even that fails)."""
        one = deployment.with_replicas(1)
        saturation = self.run(one, math.inf).requests_per_s
        light = self.run(one, saturation / 50)
        if not light.meets(slo):
            return 0.0, saturation, light.binding(slo), light
        lo, hi = saturation / 50, saturation  # a replica cannot sustain more than it completes flooded
        binding = "throughput"  # the rate it saturates at, before any latency target
        for _ in range(BISECTION_STEPS):
            mid = math.sqrt(lo * hi)
            lat = self.run(one, mid)
            if lat.meets(slo):
                lo = mid
            else:
                hi, binding = mid, lat.binding(slo)
        return lo, saturation, binding, None


def replicas_needed(simulator: Simulator, deployment: Deployment, slo: Slo, rate: float) -> int:
    """How many replicas of `deployment` serve `rate` req/s within `slo`: the planner's answer
    for one configuration (an autoscaler's question). 0 for no traffic."""
    if rate <= 0:
        return 0
    goodput, _, binding, _ = simulator.goodput(deployment, slo)
    if goodput <= 0:
        raise ConfigError(f"{deployment.describe()} misses {slo} even at light load ({binding})")
    return _confirmed(simulator, slo, rate, deployment.with_replicas(math.ceil(rate / goodput)))[0]


def _confirmed(simulator: Simulator, slo: Slo, rate: float, deployment: Deployment) -> tuple[int, Latency]:
    """The replica count checked behind the router; one or two more if the mix needs them."""
    replicas = deployment.replicas
    for n in (replicas, replicas + 1, replicas + 2):
        lat = simulator.run(deployment.with_replicas(min(n, MAX_REPLICAS)), rate,
                            max(len(simulator.workload.prompts), 20 * n))
        if lat.meets(slo) or n >= MAX_REPLICAS:
            return min(n, MAX_REPLICAS), lat
    return min(replicas + 2, MAX_REPLICAS), lat


def candidates(hardware: Sequence[Hardware], model: ModelSpec, max_model_len: int,
               formats: Sequence[str] | None = None) -> tuple[list[Deployment], list[Rejected]]:
    """Every (hardware, format, TP, PP) whose weights and one request fit (see `_layouts`)."""
    fits: list[Deployment] = []
    rejected: list[Rejected] = []
    for hw in hardware:
        allowed = formats or (CPU_FORMATS if hw.kind == "cpu" else GPU_FORMATS)
        if hw.name == THIS_MACHINE:
            allowed = [f for f in allowed if f in ("bf16", "fp32")] or ["fp32"]
        for fmt in allowed:
            if fmt == "fp8" and not hw.supports("fp8"):
                continue
            if fmt == "int8" and hw.supports("fp8") and "fp8" in allowed:
                continue  # 8-bit weights either way, and fp8 also halves the GEMMs' time
            fits += _layouts(hw, fmt, model, max_model_len, rejected)
    return fits, rejected


def _layouts(hw: Hardware, fmt: str, model: ModelSpec, max_model_len: int, rejected: list[Rejected]
             ) -> list[Deployment]:
    """The smallest TP that fits and the next one up, at the fewest pipeline stages that fit
    (PP only when one node cannot hold the model); TP1 PP1's refusal goes to `rejected`."""
    limits = CPU_BATCH_LIMITS[0] if hw.kind == "cpu" else GPU_BATCH_LIMITS[0]
    for pp in PP_SIZES if hw.kind == "gpu" else PP_SIZES[:1]:
        found: list[Deployment] = []
        for tp in TP_SIZES:
            if tp > hw.devices_per_node or model.config.num_attention_heads % tp:
                continue
            dep = Deployment(hw, fmt, tp, pp, 1, *limits)
            try:
                dep.kv_blocks(model, max_model_len)
            except ConfigError as e:
                if tp == TP_SIZES[0] and pp == 1:
                    rejected.append(Rejected(dep, str(e)))
                continue
            found.append(dep)
            if len(found) == 2:
                break
        if found:
            return found
    return []


@dataclass
class Plan:
    slo: Slo
    rate: float
    budget_per_hour: float | None
    evaluations: list[Evaluation]  # every candidate that meets the SLO at the rate, cheapest first
    rejected: list[Rejected]
    frontier: list[Evaluation]

    @property
    def recommended(self) -> Evaluation:
        return self.evaluations[0]

    def why(self) -> str:
        """What decides the recommendation: what limits one replica, and what ruled out cheaper ones."""
        best = self.recommended
        d = best.deployment
        if best.binding == "throughput":
            limit = f"each replica sustains {best.goodput:.3g} req/s within the SLO, up to its saturation"
        else:
            limit = (f"each replica sustains {best.goodput:.3g} req/s before its {best.binding} passes "
                     f"the target")
        parts = [limit, f"so {d.replicas} replica(s) serve {self.rate:g} req/s"]
        per_replica = d.cost_per_hour / d.replicas
        cheaper = [r for r in self.rejected if r.deployment.cost_per_hour < per_replica]
        if cheaper:
            parts.append(f"{len(cheaper)} cheaper replica type(s) ruled out, e.g. "
                         f"{cheaper[0].deployment.describe()}: {cheaper[0].reason}")
        return "; ".join(parts)


def pareto(evaluations: Sequence[Evaluation]) -> list[Evaluation]:
    """Not dominated in (cost per 1M tokens lower, p99 TTFT lower, goodput per replica higher)."""
    def key(e: Evaluation) -> tuple[float, float, float]:
        return e.cost_per_million, e.at_target.ttft_p99_ms, -e.goodput

    front = []
    for e in evaluations:
        k = key(e)
        if not any(all(a <= b for a, b in zip(key(o), k, strict=True)) and key(o) != k for o in evaluations):
            front.append(e)
    return sorted(front, key=lambda e: e.cost_per_million)


def make_plan(simulator: Simulator, hardware: Sequence[Hardware], slo: Slo, rate: float,
              budget_per_hour: float | None = None, formats: Sequence[str] | None = None,
              advance: Callable[[str], None] = lambda _: None) -> Plan:
    """Search, evaluate, rank; one-line errors when nothing can meet the targets."""
    if not rate > 0 or math.isinf(rate):
        raise ConfigError(f"--rate must be a positive number of requests per second, got {rate}")
    fits, rejected = candidates(hardware, simulator.model, simulator.max_model_len, formats)
    if not fits:
        biggest = max(hardware, key=lambda h: h.memory_bytes * h.devices_per_node)
        raise ConfigError(
            f"{simulator.model.name} fits no catalogue entry even at int4 with TP up to "
            f"{biggest.devices_per_node} and PP up to {max(PP_SIZES)} (largest node: {biggest.name} x"
            f"{biggest.devices_per_node}, {biggest.memory_bytes * biggest.devices_per_node / 2**30:.0f} "
            f"GiB); add hardware with more memory (--hardware FILE) or lower --max-model-len")
    scored: list[tuple[Deployment, float, float, str]] = []
    goodput_of = partial(simulator.goodput, slo=slo)
    for dep, (goodput, saturation, binding, light) in zip(
            fits, _each(goodput_of, fits, Deployment.describe, advance), strict=True):
        if goodput <= 0:
            rejected.append(Rejected(dep, f"misses {binding} even at light load", light))
            continue
        scored.append((dep, goodput, saturation, binding))
    # Batch limits, for the candidates that are cheapest per unit of goodput.
    scored.sort(key=lambda s: s[0].cost_per_hour / s[1])
    alternatives = []
    for dep, _, _, _ in scored[:REFINED]:
        limits = CPU_BATCH_LIMITS if dep.hardware.kind == "cpu" else GPU_BATCH_LIMITS
        alternatives += [replace(dep, max_num_seqs=seqs, max_num_batched_tokens=tokens)
                         for seqs, tokens in limits[1:]]
    for dep, (goodput, saturation, binding, _) in zip(
            alternatives, _each(goodput_of, alternatives, Deployment.describe, advance), strict=True):
        if goodput > 0:
            scored.append((dep, goodput, saturation, binding))
    if not scored:
        _raise_infeasible(slo, rejected)
    too_many = [s for s in scored if math.ceil(rate / s[1]) > MAX_REPLICAS]
    rejected += [Rejected(s[0], f"needs {math.ceil(rate / s[1])} replicas (more than {MAX_REPLICAS})")
                 for s in too_many]
    scored = [s for s in scored if s not in too_many]
    wanted = [s[0].with_replicas(math.ceil(rate / s[1])) for s in scored]
    confirmed = _each(partial(_confirmed, simulator, slo, rate), wanted,
                      lambda d: f"{d.describe()} at {rate:g} req/s", advance)
    evaluations = []
    tokens_per_hour = rate * simulator.workload.mean_output_tokens * 3600
    for (dep, goodput, saturation, binding), (replicas, at_target) in zip(scored, confirmed, strict=True):
        full = dep.with_replicas(replicas)
        evaluations.append(Evaluation(full, goodput, saturation, binding, at_target,
                                      full.cost_per_hour / tokens_per_hour * 1e6))
    # Ties broken as the frontier ranks (more goodput per replica: more headroom at that price),
    # so the recommendation is on it.
    evaluations.sort(key=lambda e: (e.cost_per_hour, e.at_target.ttft_p99_ms, -e.goodput))
    within = [e for e in evaluations if budget_per_hour is None or e.cost_per_hour <= budget_per_hour]
    if not within:
        cheapest = evaluations[0]
        raise ConfigError(f"the cheapest configuration meeting {slo} at {rate:g} req/s costs "
                          f"${cheapest.cost_per_hour:.2f}/hour ({cheapest.deployment.describe()}); raise "
                          f"--budget-per-hour to at least {cheapest.cost_per_hour:.2f} or lower --rate")
    return Plan(slo, rate, budget_per_hour, within, rejected, pareto(evaluations))


T = TypeVar("T")
R = TypeVar("R")


def _each(fn: Callable[[T], R], items: Sequence[T], name: Callable[[T], str],
          advance: Callable[[str], None]) -> list[R]:
    """`fn` of each item, on every core: each simulation is one Python thread's work."""
    import gc
    import os
    from concurrent.futures import ProcessPoolExecutor

    if len(items) < 2 or (os.cpu_count() or 1) < 2:
        out = []
        for item in items:
            advance(name(item))
            out.append(fn(item))
        return out
    # The workers are forks of this process. Garbage it holds (a finished engine's gloo process
    # group, say) must die here, where its threads live: a fork that collected it would wait on
    # those threads forever. What the forks inherit, they never collect.
    gc.collect()
    gc.freeze()
    try:
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            futures = [pool.submit(fn, item) for item in items]
            results = []
            for item, future in zip(items, futures, strict=True):
                advance(name(item))
                results.append(future.result())
    finally:
        gc.unfreeze()
    return results


def _raise_infeasible(slo: Slo, rejected: Sequence[Rejected]) -> None:
    tried = [r for r in rejected if r.light_load is not None]
    if not tried:
        reason = rejected[0].reason if rejected else "none tried"
        raise ConfigError(f"no candidate configuration fits: {reason}")
    best_ttft = min(tried, key=lambda r: r.light_load.ttft_p99_ms)  # type: ignore[union-attr]
    best_tpot = min(tried, key=lambda r: r.light_load.tpot_p99_ms)  # type: ignore[union-attr]
    assert best_ttft.light_load is not None and best_tpot.light_load is not None
    relax = []
    if math.isfinite(slo.ttft_p99_ms):
        relax.append(f"ttft_p99_ms={math.ceil(best_ttft.light_load.ttft_p99_ms)}")
    if math.isfinite(slo.tpot_p99_ms):
        relax.append(f"tpot_p99_ms={math.ceil(best_tpot.light_load.tpot_p99_ms * 10) / 10:g}")
    raise ConfigError(
        f"no configuration meets {slo} even at light load: the lowest p99 TTFT is "
        f"{best_ttft.light_load.ttft_p99_ms:.0f} ms ({best_ttft.deployment.describe()}) and the lowest "
        f"p99 TPOT {best_tpot.light_load.tpot_p99_ms:.1f} ms ({best_tpot.deployment.describe()}); relax "
        f"--slo to at least {','.join(relax)} or add faster hardware")
