"""`llmscale simulate` and `llmscale plan`: parsing only; the work lives in the modules."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llmscale.config import ConfigError

# What a request pays to pass Ray Serve's proxy and router to a replica here (BENCHMARKS.md,
# cluster serving): replicas in the simulator stand behind it.
RAY_PROXY_MS = 17.0

SIMULATE_EPILOG = """\
examples:
  llmscale profile --calibrate --out calib.json
  llmscale simulate --calibration calib.json --sweep-rates 0.5,1,2 --slo ttft_ms=2000,tpot_ms=200
  llmscale simulate --model llama-3.1-8b --hardware-name h100-sxm --prompt-len fixed:1000 \\
      --output-len fixed:1000 --num-prompts 3000 --request-rate inf
  llmscale simulate --calibration calib.json --num-replicas 2 --routing prefix --dataset prefix-share"""


def add_deployment_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment")
    g.add_argument("--calibration", type=Path, default=None, metavar="FILE",
                   help="this machine's fitted step times (`llmscale profile --calibrate --out FILE`)")
    g.add_argument("--hardware", type=Path, default=None, metavar="FILE",
                   help="a hardware catalogue (YAML, the shipped one's schema) whose entries replace or "
                        "extend the shipped ones")
    g.add_argument("--machine-cost-per-hour", type=float, default=0.10, metavar="USD",
                   help="what this machine costs an hour, for costs of the calibrated machine "
                        "(default: %(default)s, a 2-vCPU cloud VM)")


def register(subparsers: Any) -> None:
    from llmscale.bench.cli import add_load_args, add_workload_args
    from llmscale.engine_args import EngineArgs
    from llmscale.plan.simulator import ROUTING_POLICIES

    p = subparsers.add_parser("simulate", help="predict `bench serve` results without running the model",
                              epilog=SIMULATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default=None, help="name in reports (default: simulated <hardware>)")
    add_workload_args(p)
    add_load_args(p)
    EngineArgs.add_cli_args(p)
    add_deployment_args(p)
    g = p.add_argument_group("hardware and parallelism")
    g.add_argument("--hardware-name", default=None, metavar="NAME",
                   help="a catalogue entry to simulate (default: this-machine, which needs --calibration)")
    g.add_argument("--weight-format", default=None, metavar="FORMAT",
                   help="fp32, bf16, fp16, fp8, int8 or int4 on catalogue hardware (default: bf16)")
    # --kv-cache-dtype is an engine flag: fp8 (catalogue hardware with an fp8 peak) stores K/V as
    # FP8 engines of TensorRT-LLM and vLLM can
    # --tensor-parallel-size and --pipeline-parallel-size are engine flags: the simulated
    # deployment splits its layers too
    g.add_argument("--num-replicas", type=int, default=1, metavar="N")
    g.add_argument("--routing", default="prefix", choices=ROUTING_POLICIES,
                   help="how requests pick a replica (the cluster's policies; default: %(default)s)")
    g.add_argument("--request-overhead-ms", type=float, default=None, metavar="MS",
                   help="time a request spends outside the engine before it is scheduled: HTTP and "
                        "tokenizing (default: the calibration's measurements on this machine, with the "
                        "engine idle and busy; 2 ms on catalogue hardware; 17 ms more with replicas "
                        "behind Ray Serve's proxy)")
    p.set_defaults(func=cmd_simulate)
    register_plan(subparsers)


def _hardware(args: argparse.Namespace, calibration: Any) -> Any:
    from llmscale.config import available_memory_bytes
    from llmscale.plan.deployment import THIS_MACHINE, this_machine
    from llmscale.plan.hardware import get_hardware, load_catalogue

    name = args.hardware_name or THIS_MACHINE
    if name == THIS_MACHINE:
        if calibration is None:
            raise ConfigError("simulate needs --calibration FILE (make one with `llmscale profile "
                              "--calibrate --out FILE`) or --hardware-name NAME from the catalogue")
        return this_machine(calibration, available_memory_bytes(), args.machine_cost_per_hour)
    return get_hardware(load_catalogue(args.hardware), name)[0]


def cmd_simulate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from llmscale.bench.cli import exit_if_interrupted, finish_runs, load_plan, progress_bars, workload_spec
    from llmscale.bench.datasets import make_requests
    from llmscale.bench.metrics import parse_slo
    from llmscale.console import status
    from llmscale.engine.shard import kv_cache_blocks
    from llmscale.engine_args import EngineArgs
    from llmscale.plan.calibrate import Calibration
    from llmscale.plan.deployment import THIS_MACHINE, Deployment, ModelSpec, weight_format_of_dtype
    from llmscale.plan.simulator import CATALOGUE_REQUEST_OVERHEAD, RequestOverhead, make_router
    from llmscale.plan.sweep import simulate_sweep

    spec = workload_spec(args)
    plan = load_plan(args)
    parse_slo(args.slo)
    if args.num_replicas < 1:
        raise ConfigError("--num-replicas must be >= 1")
    calibration = Calibration.read(args.calibration) if args.calibration else None
    hardware = _hardware(args, calibration)
    engine_config = EngineArgs.from_cli_args(args).create_engine_config()
    tp, pp = engine_config.parallel.tensor_parallel_size, engine_config.parallel.pipeline_parallel_size
    kv_format = engine_config.cache.kv_cache_dtype
    model = ModelSpec.load(args.model)
    max_model_len = model.config.context_len(args.max_model_len)
    on_machine = hardware.name == THIS_MACHINE
    if on_machine:
        if (args.weight_format or tp > 1 or pp > 1
                or kv_format != "auto"):
            raise ConfigError("--weight-format, --kv-cache-dtype and parallelism apply to catalogue "
                              "hardware; this machine runs the engine's --dtype on one process")
        fmt = weight_format_of_dtype(str(engine_config.torch_dtype).removeprefix("torch."))
    else:
        fmt = weight_format_of_dtype(args.weight_format or "bf16")
        if kv_format == "fp8" and not hardware.supports("fp8"):
            raise ConfigError(f"--kv-cache-dtype fp8: {hardware.name} has no fp8 peak in the catalogue")
    device = "cpu" if hardware.kind == "cpu" else "cuda"
    import torch

    scheduler = engine_config.scheduler.resolved(torch.device(device), online=True)
    deployment = Deployment(hardware, fmt, tp, pp,
                            args.num_replicas, scheduler.max_num_seqs, scheduler.max_num_batched_tokens or 0,
                            engine_config.cache.block_size, engine_config.cache.enable_prefix_caching,
                            kv_cache_dtype=kv_format)
    if on_machine:
        num_blocks = kv_cache_blocks(engine_config.cache, model.config, engine_config.kv_dtype, max_model_len)
    else:
        num_blocks = None
        if args.kv_cache_memory is not None:  # else what the devices hold after the weights
            from llmscale.config import parse_memory

            kv_bytes = parse_memory(args.kv_cache_memory, hardware.memory_bytes)
            deployment = replace(deployment, kv_cache_bytes=kv_bytes)
    make_engine = deployment.engine_factory(model, max_model_len, calibration, scheduler, num_blocks)
    measured = calibration is not None and (calibration.model, calibration.weight_format) == (model.name, fmt)
    if on_machine and calibration is not None and not measured:
        status(f"note: the calibration measured {calibration.model} {calibration.weight_format}; "
               f"{model.name} {fmt} is predicted from its fitted roofline")
    if args.request_overhead_ms is not None:
        overhead = RequestOverhead.fixed(args.request_overhead_ms / 1e3)
    else:
        overhead = (calibration.serving_overhead().request_overhead() if on_machine and calibration
                    else CATALOGUE_REQUEST_OVERHEAD)
        overhead = overhead.plus(RAY_PROXY_MS / 1e3 if args.num_replicas > 1 else 0.0)
    spec = replace(spec, max_total_len=min(spec.max_total_len, max_model_len))
    codec = model.codec()
    label = args.label or f"simulated {hardware.name}"
    progress, start = progress_bars()
    with progress:
        runs = simulate_sweep(make_engine, args.num_replicas, lambda: make_router(args.routing, args.seed),
                              plan, lambda n, seed: make_requests(spec, codec, n, seed), model.encoder(),
                              label, start, overhead)
    simulated = {"deployment": deployment.describe(), "kv_blocks": make_engine().kv.pool.num_blocks,
                 "request_overhead_ms": overhead.idle_s * 1e3,
                 "busy_request_overhead_ms": overhead.busy_s * 1e3, "cost_per_hour": deployment.cost_per_hour}
    extra = {"model": model.name, "simulated": simulated}
    finish_runs(args, runs, f"simulate {model.name} on {deployment.describe()}", "simulate", extra)
    exit_if_interrupted(runs)



PLAN_EPILOG = """\
examples:
  llmscale plan --model llama-3.1-8b --slo ttft_p99_ms=500,tpot_p99_ms=50 --rate 20
  llmscale plan --model llama-3.1-70b --slo ttft_p99_ms=2000,tpot_p99_ms=100 --rate 5 --budget-per-hour 60
  llmscale plan --calibration calib.json --hardware-name this-machine --slo ttft_p99_ms=1000 --rate 2 \\
      --prompt-len uniform:64,384 --output-len uniform:32,128
  llmscale plan --model qwen2.5-7b --slo tpot_p99_ms=40 --rate-schedule diurnal:2,20,86400"""


def register_plan(subparsers: Any) -> None:
    from llmscale.bench.cli import add_workload_args

    p = subparsers.add_parser("plan", help="from SLOs, traffic and budget to hardware, precision, "
                                           "parallelism and replicas", epilog=PLAN_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF folder, .gguf, config.json or a shipped architecture (llama-3.1-8b, "
                        "llama-3.1-70b, qwen2.5-7b); default: the built-in model")
    p.add_argument("--slo", required=True, metavar="KEY=MS,...",
                   help="latency targets: ttft_p99_ms, tpot_p99_ms (e.g. ttft_p99_ms=500,tpot_p99_ms=50)")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float, default=None, help="requests per second to serve (Poisson)")
    rate.add_argument("--rate-schedule", default=None, metavar="FILE|SPEC",
                      help="traffic over time, as `bench serve --rate-schedule`: planned for its peak, "
                           "with the replicas an autoscaler would run over it")
    p.add_argument("--budget-per-hour", type=float, default=None, metavar="USD",
                   help="the most the deployment may cost an hour")
    p.add_argument("--hardware-name", default=None, metavar="NAMES",
                   help="only these catalogue entries, comma-separated (default: all; this-machine with "
                        "--calibration)")
    p.add_argument("--formats", default=None, metavar="F1,F2",
                   help="only these weight formats (bf16, fp8, int8, int4; fp32 on this machine)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context window to provision KV for (default: the model's, at most 8192)")
    p.add_argument("--routing", default="pow2", help="routing between replicas in the check (default: pow2)")
    p.add_argument("--out", type=Path, default=Path("results/plan"), metavar="DIR",
                   help="where plan.json and frontier.png go (default: %(default)s)")
    add_workload_args(p)
    add_deployment_args(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> None:
    import math
    from dataclasses import replace

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from llmscale.bench.arrivals import parse_rate_schedule
    from llmscale.bench.cli import workload_spec
    from llmscale.bench.datasets import make_requests
    from llmscale.config import available_memory_bytes
    from llmscale.console import stdout_console
    from llmscale.plan import report
    from llmscale.plan.calibrate import Calibration
    from llmscale.plan.deployment import THIS_MACHINE, ModelSpec, this_machine
    from llmscale.plan.hardware import get_hardware, load_catalogue
    from llmscale.plan.planner import Simulator, Slo, Workload, make_plan
    from llmscale.plan.simulator import CATALOGUE_REQUEST_OVERHEAD
    from llmscale.plan.step_model import WEIGHT_BYTES

    slo = Slo.parse(args.slo)
    schedule = parse_rate_schedule(args.rate_schedule) if args.rate_schedule else None
    rate = max(r for _, r in schedule.segments) if schedule else args.rate
    if not rate or not rate > 0 or math.isinf(rate):
        raise ConfigError(f"--rate must be a positive number of requests per second, got {args.rate}")
    calibration = Calibration.read(args.calibration) if args.calibration else None
    catalogue = load_catalogue(args.hardware)
    if calibration is not None:
        catalogue[THIS_MACHINE] = this_machine(calibration, available_memory_bytes(),
                                               args.machine_cost_per_hour)
    if args.hardware_name and THIS_MACHINE in args.hardware_name.split(",") and calibration is None:
        raise ConfigError(f"{THIS_MACHINE} needs --calibration FILE (make one with `llmscale profile "
                          f"--calibrate`)")
    hardware = get_hardware(catalogue, args.hardware_name)
    formats = None
    if args.formats:
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        unknown = [f for f in formats if f not in WEIGHT_BYTES]
        if unknown or not formats:
            raise ConfigError(f"--formats: unknown {', '.join(unknown) or '(none)'}; choose from "
                              f"{', '.join(WEIGHT_BYTES)}")
    model = ModelSpec.load(args.model)
    window = args.max_model_len or min(model.config.max_position_embeddings, 8192)
    max_model_len = model.config.context_len(window)
    spec = replace(workload_spec(args), max_total_len=min(args.max_total_len, max_model_len))
    codec = model.codec()
    encode = model.encoder()
    requests = make_requests(spec, codec, min(args.num_prompts or 150, 400), args.seed)
    workload = Workload([encode(r.text) for r in requests], [r.output_len for r in requests], args.seed)
    overhead = (calibration.serving_overhead().request_overhead() if calibration is not None
                else CATALOGUE_REQUEST_OVERHEAD)
    simulator = Simulator(model, workload, max_model_len, calibration, args.routing, overhead)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=True) as progress:
        task = progress.add_task("candidates")
        plan = make_plan(simulator, hardware, slo, rate, args.budget_per_hour, formats,
                         lambda what: progress.update(task, description=f"simulating {what}"))
    console = stdout_console()
    report.print_plan(plan, model, schedule, console)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_plan(plan, model, schedule, args.out / "plan.json")
    png = report.plot_frontier(plan, model, args.out / "frontier.png")
    console.print(f"wrote {args.out / 'plan.json'} and {png}")
