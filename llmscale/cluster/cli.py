"""`llmscale cluster serve` and `llmscale cluster status`.

`cluster serve` starts (or with `--address` joins) a Ray cluster, deploys the application of
`cluster/app.py` on Ray Serve and waits for SIGTERM/SIGINT; then it drains (Serve lets
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
from typing import Any

from llmscale.config import ConfigError, EngineConfig
from llmscale.console import status, stdout_console

APP_NAME = "llmscale"
ROUTER_CHOICES = ("prefix", "pow2", "round-robin")


def register(subparsers: Any) -> None:
    from llmscale.cli import add_engine_args
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
    add_serve_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="the replicas of a running `cluster serve`, as a table")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the cluster's endpoint")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    p.set_defaults(func=cmd_status)


def cmd_serve(args: argparse.Namespace) -> None:
    from llmscale.cli import engine_config_from_args

    if args.num_replicas < 1 or args.replica_cpus <= 0:
        raise ConfigError("--num-replicas must be >= 1 and --replica-cpus > 0")
    config = engine_config_from_args(args)
    # Ray and Serve load only to serve, not to build the CLI parser.
    from ray import serve

    from llmscale.cluster.board import StatusBoard
    from llmscale.cluster.ray_cluster import connect

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
        board = StatusBoard.remote()
        status(f"llmscale cluster serve: starting {args.num_replicas} replica(s) of {config.model_name} "
               f"({args.replica_cpus:g} CPU each), router {args.router}, Ray at {cluster.address}")
        deploy(args, config, board)
        status(f"llmscale cluster serve: ready at http://{args.host}:{args.port}/v1 "
               f"(status: /cluster/status; Ctrl-C to stop)")
        stop.wait()
        status(f"llmscale cluster serve: shutting down, finishing requests in flight "
               f"(up to {args.drain_timeout:g} s)")
        drain(board, args.drain_timeout)
        serve.delete(APP_NAME)
    finally:
        cluster.shutdown()
    status("llmscale cluster serve: stopped")


def deploy(args: argparse.Namespace, config: EngineConfig, board: Any) -> None:
    """Run the application and wait until it serves; a replica whose engine refused its config
    ends the command with that one-line error."""
    import ray
    from ray import serve

    from llmscale.cluster.app import ApiOptions, build_app
    from llmscale.serve.cost import CostModel

    cost = CostModel(args.price_input_per_1m, args.price_output_per_1m, args.hardware_cost_per_hour)
    api = ApiOptions(args.served_model_name, args.api_key, args.max_queue, args.max_n, args.max_body_bytes,
                     cost)
    app = build_app(config, board, args.num_replicas, args.replica_cpus, args.router, api,
                    drain_timeout_s=args.drain_timeout)
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
    stdout_console().print(table)
