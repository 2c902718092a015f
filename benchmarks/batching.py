"""Static vs dynamic vs continuous batching on the same seeded Poisson load, in-process.

    python benchmarks/batching.py [--rates 0.5,1,2,4] [--num-prompts 20] [--prompt-len fixed:64]
                                  [--output-len fixed:32] [--policies static,dynamic,continuous]
                                  [--slo ttft_ms=2000,tpot_ms=200] [--out results/batching]

Each policy gets its own engine (same model, dtype, KV cache and limits) and, at each rate, the
same requests arriving at the same times: run i of every policy uses seed `--seed + i` for both
prompts and arrivals, and every run draws fresh prompts, so no run is served from a prefix cache
an earlier run filled. The engine is driven step by step (`llmscale.bench.offline`): a request
that falls due during a step joins after it, with its clock started at its arrival time.

  static      waits for `--static-batch-size` requests (or the batch timeout), runs that batch
              to completion, only then admits more
  dynamic     like static, but takes everything that waited, up to `--max-num-seqs`
  continuous  admits and retires requests at every step (iteration-level scheduling)

The defaults (20 requests of 64 prompt + 32 output tokens per run, 4 rates, 3 policies) are
sized for about 10 minutes on an idle 2-core CPU with the default model; sizes are flags.
Writes a table, results.json (every request's timings) and PNGs to `--out`.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmscale.bench import report
from llmscale.bench.arrivals import parse_rates
from llmscale.bench.datasets import BenchRequest, Codec, WorkloadSpec, make_requests
from llmscale.bench.lengths import parse_length
from llmscale.bench.load import INTERRUPTED, LoadPlan
from llmscale.bench.metrics import Run, max_rate_meeting_slo, parse_slo
from llmscale.bench.offline import offline_sweep
from llmscale.config import BATCHING_POLICIES, ConfigError, EngineConfig
from llmscale.console import stdout_console

console = stdout_console()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rates", default="0.5,1,2,4", help="request rates (req/s), one run each per policy")
    ap.add_argument("--policies", default="static,dynamic,continuous")
    ap.add_argument("--num-prompts", type=int, default=20, help="requests per run")
    ap.add_argument("--prompt-len", default="fixed:64",
                    help="fixed:N, uniform:LO,HI, normal:MEAN,STD or lognormal:MEAN,SIGMA")
    ap.add_argument("--output-len", default="fixed:32", help="same forms; EOS is ignored")
    ap.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1, help="requests run once per engine before measuring")
    ap.add_argument("--slo", default="ttft_ms=2000,tpot_ms=200",
                    help="goodput SLOs (ttft_ms, tpot_ms, e2e_ms)")
    ap.add_argument("--slo-attainment", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=Path("results/batching"))
    ap.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=32, help="dynamic and continuous: batch size cap")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--static-batch-size", type=int, default=8, help="static: requests per batch")
    ap.add_argument("--batch-timeout", type=float, default=None, metavar="S",
                    help="static and dynamic: longest wait for a batch to fill (default: the engine's)")
    args = ap.parse_args()
    try:
        run(args)
    except ConfigError as e:
        ap.exit(2, f"batching.py: error: {e}\n")


def run(args: argparse.Namespace) -> None:
    from llmscale.engine.llm_engine import LLMEngine
    from llmscale.model.lookup import resolve_model

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if bad := [p for p in policies if p not in BATCHING_POLICIES]:
        raise ConfigError(f"--policies: unknown {bad}; choose from {', '.join(BATCHING_POLICIES)}")
    plan = LoadPlan(parse_rates(args.rates, "--rates"), args.num_prompts, args.burstiness, None, args.seed,
                    args.warmup)
    plan.validate()
    spec = WorkloadSpec(prompt_len=parse_length(args.prompt_len, "--prompt-len"),
                        output_len=parse_length(args.output_len, "--output-len"),
                        max_total_len=args.max_model_len)
    slo = parse_slo(args.slo)
    codec = Codec.load(resolve_model(args.model))  # one tokenizer: every policy gets the same prompts

    def workload(n: int, seed: int) -> list[BenchRequest]:
        return make_requests(spec, codec, n, seed)

    runs: list[Run] = []
    settings = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        def start(description: str, total: int) -> Callable[[], None]:
            task = progress.add_task(description, total=total)
            return lambda: progress.advance(task)

        for policy in policies:
            config = EngineConfig.from_kwargs(
                model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, batching=policy,
                static_batch_size=args.static_batch_size, batch_timeout_s=args.batch_timeout)
            settings[policy] = {"static_batch_size": config.scheduler.static_batch_size,
                                "batch_timeout_s": config.scheduler.batch_timeout_s,
                                "max_num_seqs": config.scheduler.max_num_seqs,
                                "max_num_batched_tokens": config.scheduler.max_num_batched_tokens}
            progress.console.print(f"{policy}: loading the engine")
            engine = LLMEngine(config)
            runs += offline_sweep(engine, plan, workload, policy, start)
            del engine
            gc.collect()
            if runs and runs[-1].interrupted == INTERRUPTED:
                break

    title = (f"batching: {args.num_prompts} requests/run, prompt {spec.prompt_len}, "
             f"output {spec.output_len}, burstiness {args.burstiness:g}")
    console.print(report.table(runs, slo, title))
    for policy in policies:
        best = max_rate_meeting_slo([r for r in runs if r.label == policy], slo, args.slo_attainment)
        if slo:
            console.print(f"{policy}: highest rate with >= {args.slo_attainment:.0%} of requests within "
                          f"the SLOs: {'none' if best is None else f'{best:g} req/s'}")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report.write_json(args.out / "results.json", config, runs, slo, {"engine_settings": settings})
    pngs = report.plot(runs, args.out, slo, "static vs dynamic vs continuous batching")
    console.print(f"wrote {args.out / 'results.json'} and {', '.join(p.name for p in pngs)}")


if __name__ == "__main__":
    main()
