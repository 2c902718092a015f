"""`llmscale bench serve` (load against any OpenAI-compatible server) and `llmscale bench offline`
(the same workloads on an in-process engine). Parsing only; the work lives in the modules."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmscale.config import ConfigError

DEFAULT_NUM_PROMPTS = 100
NO_CAP = sys.maxsize  # a rate schedule's run draws as many requests as it draws

SERVE_EPILOG = """\
examples:
  llmscale bench serve --request-rate 2 --num-prompts 50
  llmscale bench serve --sweep-rates 0.5,1,2,inf --slo ttft_ms=2000,tpot_ms=200 --out results/sweep
  llmscale bench serve --rate-schedule steps:1x30,4x30,1x30 --slo ttft_ms=2000 --out results/burst
  llmscale bench serve --dataset jsonl sharegpt.jsonl --endpoint chat --max-concurrency 8
  llmscale bench serve --dataset prefix-share --num-prefixes 4 --prefix-len 512"""


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", nargs="+", default=["synthetic"], metavar="ARG",
                   help="synthetic | jsonl FILE | prefix-share (default: synthetic). jsonl lines are "
                        '{"prompt": str, "output_len": int} or ShareGPT {"conversations": [...]}')
    g.add_argument("--prompt-len", default="fixed:256", metavar="DIST",
                   help="prompt tokens: fixed:N, uniform:LO,HI, normal:MEAN,STD or lognormal:MEAN,SIGMA "
                        "(lognormal has ShareGPT's long right tail) (default: %(default)s)")
    g.add_argument("--output-len", default="fixed:64", metavar="DIST",
                   help="output tokens, same forms; jsonl records without a length draw from it "
                        "(default: %(default)s)")
    g.add_argument("--max-total-len", type=int, default=2048,
                   help="cap on prompt + output tokens per request; longer prompts are cut "
                        "(default: %(default)s)")
    g.add_argument("--num-prefixes", type=int, default=4, help="prefix-share: distinct system prompts")
    g.add_argument("--prefix-len", type=int, default=512, help="prefix-share: tokens per system prompt")
    g.add_argument("--num-prompts", type=int, default=None,
                   help=f"requests per run (default: {DEFAULT_NUM_PROMPTS}; with --rate-schedule, every "
                        "request the schedule draws)")
    g.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and arrivals")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the drawn output lengths (default: on)")


def add_load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second; inf sends all at once (default: inf)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps: 1 is Poisson, < 1 burstier, > 1 more even")
    g.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    g.add_argument("--sweep-rates", default=None, metavar="R1,R2,...",
                   help="one run per rate (e.g. 0.5,1,2,4,inf) instead of --request-rate")
    g.add_argument("--rate-schedule", default=None, metavar="FILE|SPEC",
                   help="one run whose rate varies with time, instead of --request-rate or --sweep-rates: "
                        "steps:R1xS1,R2xS2,... (R req/s for S seconds, e.g. steps:1x30,4x30,1x30), "
                        "diurnal:LOW,HIGH,PERIOD_S[,DURATION_S] (a sinusoid from LOW at 0 s to HIGH at "
                        "PERIOD_S/2 and back, in 1/96-period steps; one period by default, e.g. "
                        "diurnal:0.5,4,600), or a FILE of 'SECONDS,RATE' (or 'SECONDS RATE') lines: each the "
                        "start of a segment and its rate, from 0 s, increasing, the last 'END_SECONDS,0' "
                        "where the schedule ends; '#' starts a comment. --burstiness applies")
    g.add_argument("--warmup", type=int, default=1, help="requests sent first and left out of the stats")
    g.add_argument("--max-duration", type=float, default=None, metavar="S",
                   help="stop each run after S seconds, keeping what was measured")
    g.add_argument("--slo", default=None, metavar="KEY=MS,...",
                   help="goodput SLOs: ttft_ms, tpot_ms, e2e_ms (e.g. ttft_ms=2000,tpot_ms=200)")
    g.add_argument("--slo-attainment", type=float, default=0.9,
                   help="share of requests that must meet the SLOs for a rate to count in a sweep's "
                        "goodput (default: %(default)s)")
    g.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where the JSON and PNGs go (default: bench-results/<command>-<time>)")


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="measure latency, throughput and goodput")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser("serve", help="streamed load against an OpenAI-compatible server",
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000")
    g.add_argument("--model", default=None, help="model to request (default: the first the server lists)")
    g.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    g.add_argument("--tokenizer", default=None,
                   help="HF folder or tokenizer.json that sizes prompts (default: the built-in model's)")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="longest wait for the next byte of a response")
    g.add_argument("--label", default=None, help="name of this system in reports (default: the model name)")
    g.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="an HTTP header sent with every request (repeatable), e.g. "
                        "x-llmscale-user-location:48.1,11.6 for `llmscale edge serve`")
    add_workload_args(p)
    add_load_args(p)
    p.set_defaults(func=cmd_serve)

    from llmscale.engine_args import EngineArgs

    p = sub.add_parser("offline", help="the same workloads on an in-process engine, without HTTP")
    p.add_argument("--label", default="llmscale", help="name in reports")
    add_workload_args(p)
    add_load_args(p)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_offline)


def workload_spec(args: argparse.Namespace) -> Any:
    from llmscale.bench.datasets import DATASETS, WorkloadSpec
    from llmscale.bench.lengths import parse_length

    name, *rest = args.dataset
    if name not in DATASETS:
        raise ConfigError(f"--dataset: unknown {name!r}; choose synthetic, jsonl FILE or prefix-share")
    if (name == "jsonl") != (len(rest) == 1) or len(rest) > 1:
        raise ConfigError("--dataset: jsonl takes exactly one FILE, the others none")
    spec = WorkloadSpec(name, Path(rest[0]) if rest else None, parse_length(args.prompt_len, "--prompt-len"),
                        parse_length(args.output_len, "--output-len"), args.max_total_len,
                        args.num_prefixes, args.prefix_len)
    spec.validate()
    return spec


def load_plan(args: argparse.Namespace) -> Any:
    from llmscale.bench.arrivals import parse_rate_schedule, parse_rates
    from llmscale.bench.load import LoadPlan

    schedule = None
    if args.rate_schedule is not None:
        if args.sweep_rates or args.request_rate != math.inf:
            raise ConfigError("--rate-schedule sets the rate over time; it cannot go with --sweep-rates "
                              "or --request-rate")
        schedule = parse_rate_schedule(args.rate_schedule)
        rates = [schedule.mean_rate]
    elif args.sweep_rates:
        rates = parse_rates(args.sweep_rates)
    else:
        rates = parse_rates(str(args.request_rate), "--request-rate")
    num_prompts = args.num_prompts if args.num_prompts is not None else \
        NO_CAP if schedule else DEFAULT_NUM_PROMPTS
    plan = LoadPlan(rates, num_prompts, args.burstiness, args.max_concurrency, args.seed, args.warmup,
                    args.max_duration, getattr(args, "request_timeout", 600.0), schedule)
    plan.validate()
    if not 0 < args.slo_attainment <= 1:
        raise ConfigError("--slo-attainment must be in (0, 1]")
    return plan


def progress_bars() -> tuple[Any, Callable[[str, int], Callable[[], None]]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn())

    def start(description: str, total: int) -> Callable[[], None]:
        task = progress.add_task(description, total=total)
        return lambda: progress.advance(task)

    return progress, start


def finish_runs(args: argparse.Namespace, runs: list[Any], title: str, kind: str,
            extra: dict[str, Any] | None = None) -> None:
    from llmscale.bench import report
    from llmscale.bench.load import fmt_rate
    from llmscale.bench.metrics import max_rate_meeting_slo, parse_slo
    from llmscale.console import stdout_console

    console = stdout_console()
    if not runs:
        console.print("[yellow]nothing was measured[/yellow]")
        return
    slo = parse_slo(args.slo)
    console.print(report.table(runs, slo, title))
    if slo and len(runs) > 1:
        best = max_rate_meeting_slo(runs, slo, args.slo_attainment)
        console.print(f"goodput (DistServe): highest rate with >= {args.slo_attainment:.0%} of requests "
                      f"within the SLOs: {'none' if best is None else fmt_rate(best) + ' req/s'}")
    out: Path = args.out or Path("bench-results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    if config.get("api_key"):
        config["api_key"] = "(set)"  # a results file gets shared; the key must not travel with it
    report.write_json(out / "results.json", config, runs, slo, extra)
    pngs = report.plot(runs, out, slo, title)
    console.print(f"wrote {out / 'results.json'} and {', '.join(p.name for p in pngs)}")


def exit_if_interrupted(runs: list[Any]) -> None:
    from llmscale.bench.load import INTERRUPTED

    if any(r.interrupted == INTERRUPTED for r in runs):
        raise KeyboardInterrupt  # results are written; the shell still sees an interrupted command


def parse_headers(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """--header NAME:VALUE values; a one-line error for one without a name or colon."""
    out = []
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or not name.strip() or any(c in name for c in " \t\r\n") or "\n" in value:
            raise ConfigError(f"--header {spec!r}: expected NAME:VALUE")
        out.append((name.strip(), value.strip()))
    return tuple(out)


def cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    import httpx

    from llmscale.bench.client import Target, normalize_base_url, served_model
    from llmscale.bench.datasets import Codec, make_requests
    from llmscale.bench.load import run_sweep

    spec = workload_spec(args)
    plan = load_plan(args)
    headers = parse_headers(args.header)
    from llmscale.bench.metrics import parse_slo

    parse_slo(args.slo)  # a typo should fail before the run, not after it
    base_url = normalize_base_url(args.base_url)

    async def model_name() -> str:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await served_model(client, base_url, args.api_key)

    model = args.model or asyncio.run(model_name())
    if args.tokenizer:
        codec = Codec.load(args.tokenizer)
    else:
        from llmscale.model.lookup import resolve_model

        codec = Codec.load(resolve_model(None))
    target = Target(base_url, model, args.endpoint, args.api_key, args.ignore_eos, headers)
    label = args.label or model.rstrip("/").rsplit("/", 1)[-1]  # servers may name a model by its path
    progress, start = progress_bars()
    with progress:
        runs = run_sweep(target, plan, lambda n, seed: make_requests(spec, codec, n, seed), label, start)
    finish_runs(args, runs, f"bench serve {base_url} ({args.endpoint})", "serve", {"model": model})
    exit_if_interrupted(runs)


def cmd_offline(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from llmscale.bench.datasets import Codec, make_requests
    from llmscale.bench.metrics import parse_slo
    from llmscale.bench.offline import offline_sweep
    from llmscale.engine.llm_engine import LLMEngine
    from llmscale.engine_args import EngineArgs

    spec = workload_spec(args)
    plan = load_plan(args)
    parse_slo(args.slo)
    config = EngineArgs.from_cli_args(args).create_engine_config()
    engine = LLMEngine(config)
    spec = replace(spec, max_total_len=min(spec.max_total_len, engine.max_model_len))
    codec = Codec(engine.tokenizer.backend)
    progress, start = progress_bars()
    try:
        with progress:
            runs = offline_sweep(engine, plan, lambda n, seed: make_requests(spec, codec, n, seed),
                                 args.label, start, args.ignore_eos)
    finally:
        engine.shutdown()  # its worker ranks, if any
    finish_runs(args, runs, f"bench offline ({args.label}, {config.scheduler.batching} batching)", "offline")
    exit_if_interrupted(runs)
