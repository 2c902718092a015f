"""The same workloads and arrival processes on an in-process engine: no HTTP, no server, so
what is measured is the engine alone (`llmscale bench offline`, benchmarks/batching.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from llmscale.bench.datasets import BenchRequest
from llmscale.bench.load import INTERRUPTED, LoadPlan, MakeWorkload, run_seed
from llmscale.bench.metrics import RequestResult, Run


def run_engine(engine: Any, requests: list[BenchRequest], rate: float, plan: LoadPlan, seed: int,
               label: str, on_done: Callable[[], None], ignore_eos: bool = True,
               arrivals: list[float] | None = None) -> Run:
    """Drive an `LLMEngine` step by step, adding each request at its arrival time (by default the
    first len(requests) of `plan.run_arrivals`). A request that falls due during a step joins
    after it, but its clock started at its arrival time."""
    from llmscale.engine.sampling_params import SamplingParams

    if arrivals is None:
        arrivals = plan.run_arrivals(rate, seed)[:len(requests)]
    results = [RequestResult(i, r.prompt_len, r.output_len, at)
               for i, (r, at) in enumerate(zip(requests, arrivals, strict=True))]
    arrived: dict[str, float] = {}  # request id -> arrival (monotonic)
    last: dict[str, float] = {}  # request id -> time of its latest token
    cap = plan.max_concurrency or len(requests)
    freed_s = 0.0  # when a slot last freed up: with a concurrency cap, a request's clock starts then
    reason: str | None = None
    t0 = time.monotonic()
    nxt = 0
    try:
        while nxt < len(requests) or engine.has_unfinished_requests():
            now = time.monotonic()
            if plan.max_duration_s and now - t0 > plan.max_duration_s:
                reason = f"time limit {plan.max_duration_s:g} s"
                break
            while nxt < len(requests) and t0 + arrivals[nxt] <= now and len(arrived) < cap:
                rid = str(nxt)
                r = requests[nxt]
                arrived[rid] = max(t0 + arrivals[nxt], freed_s)
                results[nxt].start_s = arrived[rid] - t0
                params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=ignore_eos)
                engine.add_request(rid, r.text, params, arrival_time_s=arrived[rid])
                nxt += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, t0 + arrivals[nxt] - time.monotonic()) if len(arrived) < cap else 0.001)
                continue
            steps = engine.stats["steps"]
            outputs = engine.step()
            t = time.monotonic()
            if engine.stats["steps"] == steps:
                time.sleep(0.001)  # a request-level batching policy is waiting for its batch to fill
            for out in outputs:
                rid = out.request_id
                res = results[int(rid)]
                n = len(out.outputs[0].token_ids)
                if n > res.output_tokens:
                    if res.ttft_s is None:
                        res.ttft_s = t - arrived[rid]
                    else:
                        res.itl_s.append(t - last[rid])
                    last[rid] = t
                    res.output_tokens = n
                if out.finished:
                    res.prompt_tokens = len(out.prompt_token_ids)
                    res.e2e_s = t - arrived.pop(rid)
                    res.success = True
                    freed_s = t
                    on_done()
    except KeyboardInterrupt:
        reason = INTERRUPTED
    duration = time.monotonic() - t0
    for rid in list(arrived):
        engine.abort_request(rid)
        results[int(rid)].error = f"cancelled: {reason}"
    return Run(label, rate, plan.burstiness, plan.max_concurrency, seed, duration, results[:nxt], reason,
               plan.rate_schedule)


def offline_sweep(engine: Any, plan: LoadPlan, make_workload: MakeWorkload, label: str,
                  progress_factory: Callable[[str, int], Callable[[], None]],
                  ignore_eos: bool = True) -> list[Run]:
    """Warm up, then one run per rate (or the rate schedule's one run); Ctrl-C ends the sweep
    with what was measured."""
    if plan.warmup:
        warm = make_workload(plan.warmup, plan.seed + len(plan.rates))
        run_engine(engine, warm, float("inf"), plan, 0, "warm-up", lambda: None, ignore_eos,
                   [0.0] * len(warm))  # all at once, whatever the plan's rates
    runs: list[Run] = []
    for i, rate in enumerate(plan.rates):
        seed = run_seed(plan, i)
        arrivals = plan.run_arrivals(rate, seed)
        requests = make_workload(len(arrivals), seed)  # a schedule decides how many
        on_done = progress_factory(plan.describe(label, rate), len(requests))
        runs.append(run_engine(engine, requests, rate, plan, seed, label, on_done, ignore_eos, arrivals))
        if runs[-1].interrupted == INTERRUPTED:
            break
    return runs
