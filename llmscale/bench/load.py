"""Open-loop load against a server: requests leave at their arrival times whatever the server
is doing (or, with a concurrency cap, as soon as a slot frees up after that time). A sweep is
one run per fixed rate, or a single run that follows a rate schedule."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from llmscale.bench.arrivals import RateSchedule, arrival_times
from llmscale.bench.client import Target, send
from llmscale.bench.datasets import BenchRequest
from llmscale.bench.metrics import RequestResult, Run
from llmscale.config import ConfigError

INTERRUPTED = "interrupted (Ctrl-C)"
MakeWorkload = Callable[[int, int], list[BenchRequest]]  # (count, seed) -> requests


@dataclass(frozen=True)
class LoadPlan:
    rates: list[float]  # with a rate schedule: its mean rate alone
    num_prompts: int  # requests per run; with a rate schedule, the most it may draw
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    warmup: int = 1
    max_duration_s: float | None = None  # per run
    request_timeout_s: float = 600.0  # longest silence allowed within one response
    rate_schedule: RateSchedule | None = None  # time-varying rate: one run that follows it

    def validate(self) -> None:
        if self.num_prompts < 1 or self.warmup < 0:
            raise ConfigError("--num-prompts must be >= 1 and --warmup >= 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError("--max-concurrency must be >= 1")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ConfigError("--max-duration must be > 0")
        if not 0 < self.burstiness < math.inf:
            raise ConfigError(f"--burstiness must be a positive number, got {self.burstiness}")
        if self.rate_schedule is not None and self.rates != [self.rate_schedule.mean_rate]:
            raise ConfigError("--rate-schedule is one run at the schedule's mean rate; it cannot go with "
                              "--sweep-rates or --request-rate")

    def run_arrivals(self, rate: float, seed: int) -> list[float]:
        """Send times of one run. Fixed rate: num_prompts arrivals (arrival_times). With a rate
        schedule: the schedule's arrivals, at most num_prompts."""
        if self.rate_schedule is not None:
            return self.rate_schedule.arrival_times(self.num_prompts, self.burstiness, seed)
        return arrival_times(self.num_prompts, rate, self.burstiness, seed)

    def describe(self, label: str, rate: float) -> str:
        """A run's name in progress bars."""
        if self.rate_schedule is not None:
            return f"{label} @ {self.rate_schedule.spec} (mean {fmt_rate(rate)} req/s)"
        return f"{label} @ {fmt_rate(rate)} req/s"


class Stop:
    """Set once, with the reason the runs end early (Ctrl-C, the time limit)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.event.set()


def run_seed(plan: LoadPlan, i: int) -> int:
    # Each run of a sweep gets its own prompts, so no run is served from a prefix cache that an
    # earlier run filled; the distributions stay the same.
    return plan.seed + i


async def run_one(client: httpx.AsyncClient, target: Target, requests: list[BenchRequest], rate: float,
                  plan: LoadPlan, seed: int, stop: Stop, on_done: Callable[[], None], label: str,
                  arrivals: list[float] | None = None) -> Run:
    """One run; `arrivals` default to the first len(requests) of `plan.run_arrivals`."""
    if arrivals is None:
        arrivals = plan.run_arrivals(rate, seed)[:len(requests)]
    results = [RequestResult(i, r.prompt_len, r.output_len, at)
               for i, (r, at) in enumerate(zip(requests, arrivals, strict=True))]
    slots = asyncio.Semaphore(plan.max_concurrency or len(requests))
    run_stop = Stop()  # this run's: the sweep's Stop or this run's time limit
    forward = asyncio.create_task(stop.event.wait())
    forward.add_done_callback(lambda t: t.cancelled() or run_stop.set(stop.reason or "stopped"))
    loop = asyncio.get_running_loop()
    timer = loop.call_later(plan.max_duration_s, run_stop.set, f"time limit {plan.max_duration_s:g} s") \
        if plan.max_duration_s else None
    t0 = time.perf_counter()

    started: list[int] = []

    async def one(i: int) -> None:
        async with slots:
            started.append(i)
            await send(client, target, requests[i], results[i], t0)
        on_done()

    tasks: list[asyncio.Task[None]] = []
    for i, at in enumerate(arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            try:
                await asyncio.wait_for(run_stop.event.wait(), delay)
            except TimeoutError:
                pass
        if run_stop.event.is_set():
            break
        tasks.append(asyncio.create_task(one(i)))
    if tasks and not run_stop.event.is_set():
        stopper = asyncio.create_task(run_stop.event.wait())
        await asyncio.wait([asyncio.gather(*tasks), stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    duration = time.perf_counter() - t0
    for t in tasks:
        t.cancel()  # closing the connection makes the server abort the request
    await asyncio.gather(*tasks, return_exceptions=True)
    forward.cancel()
    if timer:
        timer.cancel()
    sent = [results[i] for i in sorted(started)]  # queued for a slot but never sent: not part of the run
    for r in sent:
        if not r.success and r.error is None:
            r.error = f"cancelled: {run_stop.reason}"
    return Run(label, rate, plan.burstiness, plan.max_concurrency, seed, duration, sent, run_stop.reason,
               plan.rate_schedule)


async def sweep(target: Target, plan: LoadPlan, make_workload: MakeWorkload, label: str,
                progress_factory: Callable[[str, int], Callable[[], None]], stop: Stop) -> list[Run]:
    """Warm up, then one run per rate (or the rate schedule's one run), until the rates are done
    or `stop` is set."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(plan.request_timeout_s, connect=30.0)
    runs: list[Run] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        # A seed no run uses, so warm-up prompts never sit in the prefix cache for a run.
        warm = make_workload(plan.warmup, plan.seed + len(plan.rates)) if plan.warmup else []
        for r in warm:  # one at a time: warms the server without loading it
            res = RequestResult(-1, r.prompt_len, r.output_len, 0.0)
            await send(client, target, r, res, time.perf_counter())
            if not res.success:
                raise ConfigError(f"warm-up request to {target.base_url} failed: {res.error}")
        for i, rate in enumerate(plan.rates):
            if stop.event.is_set():
                break
            seed = run_seed(plan, i)
            arrivals = plan.run_arrivals(rate, seed)
            requests = make_workload(len(arrivals), seed)  # a schedule decides how many
            on_done = progress_factory(plan.describe(label, rate), len(requests))
            runs.append(await run_one(client, target, requests, rate, plan, seed, stop, on_done, label,
                                      arrivals))
    return runs


def fmt_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def run_sweep(target: Target, plan: LoadPlan, make_workload: MakeWorkload, label: str,
              progress_factory: Callable[[str, int], Callable[[], None]]) -> list[Run]:
    """`sweep` under asyncio; the first Ctrl-C ends the runs cleanly (what was measured is
    kept), a second one exits at once."""
    async def main() -> list[Run]:
        stop = Stop()
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            stop.set(INTERRUPTED)
            loop.remove_signal_handler(signal.SIGINT)

        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
        try:
            return await sweep(target, plan, make_workload, label, progress_factory, stop)
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    return asyncio.run(main())
