"""A `bench serve`-shaped sweep in simulated time: the same workloads, seeds and arrivals as
`llmscale bench serve` draws for the same flags, so predicted and measured runs line up
request by request."""

from __future__ import annotations

from collections.abc import Callable

from llmscale.bench.datasets import BenchRequest
from llmscale.bench.load import LoadPlan, run_seed
from llmscale.bench.metrics import Run
from llmscale.plan.simulator import (
    NO_REQUEST_OVERHEAD,
    RequestOverhead,
    Route,
    SimEngine,
    SimWorkload,
    simulate,
)

MakeWorkload = Callable[[int, int], list[BenchRequest]]


def sim_workload(requests: list[BenchRequest], encode: Callable[[str], list[int]],
                 arrivals: list[float]) -> SimWorkload:
    """What the server's engine would receive: each completion prompt as its tokenizer encodes it."""
    return SimWorkload([encode(r.text) for r in requests], [r.output_len for r in requests], arrivals)


def simulate_sweep(make_engine: Callable[[], SimEngine], num_replicas: int,
                   route_factory: Callable[[], Route], plan: LoadPlan, make_workload: MakeWorkload,
                   encode: Callable[[str], list[int]], label: str,
                   progress_factory: Callable[[str, int], Callable[[], None]],
                   request_overhead: RequestOverhead = NO_REQUEST_OVERHEAD) -> list[Run]:
    """One simulated run per rate (or the rate schedule's one run), fresh replicas each."""
    runs = []
    for i, rate in enumerate(plan.rates):
        seed = run_seed(plan, i)
        arrivals = plan.run_arrivals(rate, seed)
        requests = make_workload(len(arrivals), seed)
        on_done = progress_factory(plan.describe(label, rate), len(requests))
        workload = sim_workload(requests, encode, arrivals)
        runs.append(simulate(make_engine, num_replicas, workload, route_factory(), label, rate,
                             plan.burstiness, seed, plan.max_concurrency, request_overhead, on_done,
                             plan.rate_schedule))
    return runs
