"""`llmscale cluster serve`, `llmscale cluster coldstart` (cluster/coldstart.py) and
`llmscale cluster status`.

`cluster serve` starts (or with `--address` joins) a Ray cluster, deploys the application of
`cluster/app.py` on Ray Serve and waits for SIGTERM/SIGINT, printing the autoscaler's
decisions as they come (with `--min-replicas`/`--max-replicas`); then it drains (Serve lets
requests in flight finish, up to `--drain-timeout`, while the app stops taking new ones) and
stops Ray if it started it. Engine and server flags mean what they mean for `llmscale serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

from llmscale.cluster.autoscale import AutoscalingOptions
from llmscale.config import ConfigError, EngineConfig
from llmscale.console import status, stdout_console

APP_NAME = "llmscale"
ROUTER_CHOICES = ("prefix", "pow2", "round-robin")
DEFAULT_SCALING = AutoscalingOptions(min_replicas=1, max_replicas=1)


def register(subparsers: Any) -> None:
    from llmscale.engine_args import EngineArgs
    from llmscale.serve.server import add_serve_args

    cluster = subparsers.add_parser("cluster", help="serve engine replicas behind one endpoint on Ray Serve")
    sub = cluster.add_subparsers(dest="cluster_command", required=True)

    p = sub.add_parser("serve", help="an OpenAI-compatible endpoint over engine replicas on a Ray cluster")
    g = p.add_argument_group("cluster")
    g.add_argument("--num-replicas", type=int, default=1, help="engine replicas (default: 1)")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica; its engine runs that many threads (default: 1)")
    g.add_argument("--router", default="prefix", choices=ROUTER_CHOICES,
                   help="prefix: where the prompt's leading blocks are cached, bounded by load; pow2: the "
                        "less loaded of two random replicas; round-robin (default: prefix)")
    g.add_argument("--address", default=None,
                   help="join the Ray cluster at this address (host:port of its GCS) instead of starting one")
    g = p.add_argument_group("autoscaling (on when --min-replicas or --max-replicas is given)")
    g.add_argument("--min-replicas", type=int, default=None, metavar="N",
                   help="never fewer replicas; 0 scales to zero when idle (default with --max-replicas: 1)")
    g.add_argument("--max-replicas", type=int, default=None, metavar="M",
                   help="never more replicas (default with --min-replicas: max(N, 1))")
    g.add_argument("--target-ttft-ms", type=float, default=None, metavar="MS",
                   help="p90 time to first token to keep replicas under "
                        f"(default: {DEFAULT_SCALING.target_ttft_ms:g})")
    g.add_argument("--target-tpot-ms", type=float, default=None, metavar="MS",
                   help="p90 time per output token to keep under "
                        f"(default: {DEFAULT_SCALING.target_tpot_ms:g})")
    g.add_argument("--scale-to-zero-after-s", type=float, default=None, metavar="S",
                   help="with --min-replicas 0: stop the last replica after S idle seconds "
                        f"(default: {DEFAULT_SCALING.scale_to_zero_after_s:g})")
    g.add_argument("--upscale-delay-s", type=float, default=None, metavar="S",
                   help="how long a need for more replicas must last "
                        f"(default: {DEFAULT_SCALING.upscale_delay_s:g})")
    g.add_argument("--downscale-delay-s", type=float, default=None, metavar="S",
                   help="how long a room for fewer replicas must last "
                        f"(default: {DEFAULT_SCALING.downscale_delay_s:g})")
    g = p.add_argument_group("cold starts")
    g.add_argument("--fallback-model", default=None, metavar="PATH",
                   help="a smaller model (as for --model, sharing its tokenizer: a quantized or distilled "
                        "student) on one always-warm replica that answers while the main model has no "
                        "replica ready; its answers say so (x-llmscale-replica: fallback, its model name)")
    g.add_argument("--no-fallback-while-cold", action="store_true",
                   help="requests wait for a main replica instead (no fallback replica is started)")
    add_serve_args(p)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("coldstart", help="where a replica's cold start goes: each phase from the request "
                                         "that starts it to its first token, table and PNG")
    p.add_argument("--repeats", type=int, default=3, help="cold starts to time (default: %(default)s)")
    p.add_argument("--label", default=None, help="name in the table and plot (default: model and dtype)")
    p.add_argument("--evict-page-cache", action="store_true",
                   help="drop the checkpoint's files from the OS page cache before each cold start, as on a "
                        "machine that has not read them since it booted")
    p.add_argument("--out", default="results/coldstart", help="where coldstart.json and coldstart.png go")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs of the replica (default: 1)")
    add_serve_args(p)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_coldstart, num_replicas=1, router="prefix", fallback_model=None,
                   no_fallback_while_cold=True)

    p = sub.add_parser("status", help="the replicas of a running `cluster serve`, as a table")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the cluster's endpoint")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    p.set_defaults(func=cmd_status)


SCALING_FLAGS = ("target_ttft_ms", "target_tpot_ms", "scale_to_zero_after_s", "upscale_delay_s",
                 "downscale_delay_s")


def autoscaling_of(args: argparse.Namespace) -> AutoscalingOptions | None:
    """The autoscaling flags, checked; None when the replica count is fixed."""
    if args.min_replicas is None and args.max_replicas is None:
        given = [f"--{f.replace('_', '-')}" for f in SCALING_FLAGS if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to autoscaling: add --min-replicas and "
                              f"--max-replicas")
        return None
    low = args.min_replicas if args.min_replicas is not None else 1
    high = args.max_replicas if args.max_replicas is not None else max(low, 1)
    tuned = {f: getattr(args, f) for f in SCALING_FLAGS if getattr(args, f) is not None}
    options = replace(DEFAULT_SCALING, min_replicas=low, max_replicas=high, **tuned)
    options.validate()
    return options


def fallback_config(args: argparse.Namespace, config: EngineConfig) -> EngineConfig | None:
    """The fallback replica's engine: the main engine's flags on `--fallback-model`, whose
    tokenizer must be the main model's (the ingress tokenizes once, for either)."""
    if args.fallback_model is None or args.no_fallback_while_cold:
        return None
    from llmscale.model.lookup import resolve_model
    from llmscale.model.tokenizer import Tokenizer

    fallback = replace(config, model=args.fallback_model)
    main_tok, fallback_tok = (Tokenizer.from_folder(resolve_model(c.model, c.keep_quantized))
                              for c in (config, fallback))
    probe = "Hello, world! 1234 ünïcode"
    if (main_tok.vocab_size, main_tok.encode(probe)) != (fallback_tok.vocab_size, fallback_tok.encode(probe)):
        raise ConfigError(f"--fallback-model {args.fallback_model}: its tokenizer differs from the main "
                          f"model's; use a student or quantized copy of {config.model_name}")
    return fallback


def cmd_serve(args: argparse.Namespace) -> None:
    from llmscale.engine_args import EngineArgs

    if args.num_replicas < 1 or args.replica_cpus <= 0:
        raise ConfigError("--num-replicas must be >= 1 and --replica-cpus > 0")
    scaling = autoscaling_of(args)
    config = EngineArgs.from_cli_args(args).create_engine_config()
    fallback = fallback_config(args, config)
    # Ray and Serve load only to serve, not to build the CLI parser.
    import ray
    from ray import serve

    from llmscale.cluster.board import NAMESPACE, REPORT_PERIOD_S, StatusBoard
    from llmscale.ray_cluster import connect

    # The replicas' and Serve's own logs (tracebacks of refused starts included) only with -v;
    # without it the command says what happened in its own lines.
    cluster = connect(args.address, host=args.host, log_to_driver=args.verbose)
    if not args.verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # After ray.init, which installs a SIGTERM handler that exits at once.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start_serve(args.port)
        board_name = f"board-{uuid.uuid4().hex[:12]}"
        board = StatusBoard.options(name=board_name, namespace=NAMESPACE).remote(
            scaling.describe() if scaling else None, args.hardware_cost_per_hour)
        count = (f"{args.num_replicas} replica(s)" if scaling is None else
                 f"{scaling.min_replicas}-{scaling.max_replicas} replicas, autoscaled to p90 TTFT "
                 f"{scaling.target_ttft_ms:g} ms / TPOT {scaling.target_tpot_ms:g} ms,")
        status(f"llmscale cluster serve: starting {count} of {config.model_name} "
               f"({args.replica_cpus:g} CPU each), router {args.router}, Ray at {cluster.address}")
        deploy(args, config, board, scaling, board_name, fallback)
        status(f"llmscale cluster serve: ready at http://{args.host}:{args.port}/v1 "
               f"(status: /cluster/status; Ctrl-C to stop)")
        shown = 0
        while not stop.wait(REPORT_PERIOD_S):
            for d in ray.get(board.decisions_since.remote(shown)):
                status(f"autoscaler: {d['previous']} -> {d['replicas']} replica(s) [{d['signal']}] "
                       f"{d['reason']}")
                shown = d["index"]
        status(f"llmscale cluster serve: shutting down, finishing requests in flight "
               f"(up to {args.drain_timeout:g} s)")
        drain(board, args.drain_timeout)
        serve.delete(APP_NAME)
    finally:
        cluster.shutdown()
    status("llmscale cluster serve: stopped")


def deploy(args: argparse.Namespace, config: EngineConfig, board: Any,
           scaling: AutoscalingOptions | None = None, board_name: str = "",
           fallback: EngineConfig | None = None) -> None:
    """Run the application and wait until it serves; a replica whose engine refused its config
    ends the command with that one-line error."""
    import ray
    from ray import serve

    from llmscale.cluster.app import ApiOptions, build_app
    from llmscale.serve.cost import CostModel

    cost = CostModel(args.price_input_per_1m, args.price_output_per_1m, args.hardware_cost_per_hour)
    slo = (scaling.target_ttft_ms, scaling.target_tpot_ms) if scaling is not None else None
    api = ApiOptions(args.served_model_name, args.api_key, args.max_queue, args.max_n, args.max_body_bytes,
                     cost, slo)
    app = build_app(config, board, args.num_replicas, args.replica_cpus, args.router, api,
                    drain_timeout_s=args.drain_timeout, autoscaling=scaling, board_name=board_name,
                    fallback=fallback)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError:
        failure = ray.get(board.start_failure.remote())
        if failure is None:
            raise
        raise ConfigError(f"a replica could not start: {failure}") from None


def drain(board: Any, timeout_s: float) -> None:
    """New requests get 503 from now on; wait until the replicas report nothing running or
    waiting (twice in a row, after the ingress has seen the flag), or for `timeout_s`. Serve's
    own stop would cut streams: its proxy dies with the cluster."""
    import ray

    from llmscale.cluster.board import REPORT_PERIOD_S

    ray.get(board.drain.remote())
    deadline = time.monotonic() + timeout_s
    time.sleep(2 * REPORT_PERIOD_S)
    idle_reports = 0
    while idle_reports < 2 and time.monotonic() < deadline:
        replicas = ray.get(board.snapshot.remote())["replicas"]
        busy = any(r["running"] or r["waiting"] for r in replicas if r["state"] != "dead")
        idle_reports = 0 if busy else idle_reports + 1
        time.sleep(REPORT_PERIOD_S)


def cmd_coldstart(args: argparse.Namespace) -> None:
    from llmscale.cluster.coldstart import cmd_coldstart as run

    run(args)


def cmd_status(args: argparse.Namespace) -> None:
    import httpx
    from rich.table import Table

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.get(f"{args.url.rstrip('/')}/cluster/status", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach {args.url}: {e}") from None
    if r.status_code != 200:
        raise ConfigError(f"{args.url}/cluster/status answered {r.status_code}: {r.text[:200]}")
    body = r.json()
    table = Table(title=f"{body['model']} at {args.url}")
    columns = ("replica", "state", "node", "pid", "running", "waiting", "KV usage", "prefix hits", "served")
    for name in columns:
        table.add_column(name, justify="left" if name in ("replica", "state", "node") else "right")
    for rep in body["replicas"]:
        table.add_row(rep["replica_id"], rep["state"], rep["node"][:12], str(rep["pid"]), str(rep["running"]),
                      str(rep["waiting"]), f"{rep['kv_usage']:.1%}", f"{rep['prefix_hit_rate']:.1%}",
                      str(rep["requests_served"]))
    console = stdout_console()
    console.print(table)
    spent, slo = body["spent"], body.get("slo")
    held = ", ".join(f"{role} {seconds:.0f} s" for role, seconds in sorted(spent["replica_seconds"].items()))
    console.print(f"replica-seconds: {held or 'none yet'}"
                  + (f" (${spent['cost_usd']:.4f})" if spent["cost_usd"] is not None else ""))
    if slo is not None and slo["attainment"] is not None:
        console.print(f"SLO (TTFT {slo['ttft_ms']:g} ms, TPOT {slo['tpot_ms']:g} ms): "
                      f"{slo['attainment']:.1%} of {slo['met'] + slo['missed']} requests met it")
    if (a := body.get("autoscaler")) is not None:
        last = a["last_decision"]
        console.print(f"autoscaler: {a['ready_replicas']} ready, {a['desired_replicas']} wanted "
                      f"({a['min_replicas']}-{a['max_replicas']}, p90 TTFT {a['target_ttft_ms']:g} ms, "
                      f"TPOT {a['target_tpot_ms']:g} ms); {a['decisions']} decisions"
                      + (f", last [{last['signal']}] {last['reason']}" if last else ""), markup=False)
