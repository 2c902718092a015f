"""`llmscale edge`: serve a fleet of edge and cloud sites behind one endpoint (`serve`), look at
it (`status`), cut and restore its links (`link`), roll a new model out to its edge sites
(`rollout`), and simulate a fleet at scale (`simulate`, cluster/edge_sim.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from llmscale.config import ConfigError
from llmscale.console import fmt_bytes, status, stdout_console
from llmscale.paths import cache_root

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers: Any) -> None:
    from llmscale.cluster.edge_sim import add_simulate_args  # argparse and dataclasses only at import

    edge = subparsers.add_parser("edge", help="edge and cloud sites behind one endpoint: placement by "
                                              "residency, latency and cost; failover; rollout")
    sub = edge.add_subparsers(dest="edge_command", required=True)

    p = sub.add_parser("serve", help="an OpenAI-compatible endpoint that places each request on a site")
    p.add_argument("--sites", type=Path, required=True, help="the sites file (YAML; see the README)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--served-model-name", default="llmscale-edge",
                   help="the model name that means 'any site' (a site's own model name picks its sites)")
    p.add_argument("--emulate-links", action=argparse.BooleanOptionalAction, default=True,
                   help="send every request through a user-space proxy per link with the link's delay, "
                        "bandwidth and loss (default: on)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="local sites' server logs (default: edge-logs under $LLMSCALE_CACHE, else "
                        "~/.cache/llmscale)")
    p.add_argument("--start-timeout", type=float, default=300.0, metavar="S",
                   help="how long a local site may take to answer after (re)starting")
    p.add_argument("--seed", type=int, default=0, help="seeds the emulated links' losses")
    p.add_argument("--hardware", type=Path, default=None, metavar="FILE",
                   help="more hardware catalogue entries for sites that name their `hardware:`")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="every site's state, load and traffic; links; the last rollout")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default: {DEFAULT_URL})")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", action="store_true", help="print /edge/status as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("link", help="cut or restore the links into a site (to test failover)")
    p.add_argument("site")
    state = p.add_mutually_exclusive_group(required=True)
    state.add_argument("--down", action="store_true")
    state.add_argument("--up", action="store_true")
    p.add_argument("--from", dest="access", default=None, metavar="SITE",
                   help="only the link from this access site (default: every link into it)")
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("rollout", help="update the edge sites' model in waves, rolling back a bad wave")
    p.add_argument("--model", required=True, help="the new model (a path on the gateway's machine)")
    p.add_argument("--sites", type=Path, default=None,
                   help="the sites file the gateway serves: its edge sites are updated (default: all the "
                        "gateway started)")
    p.add_argument("--waves", default="10%,50%,100%",
                   help="cumulative shares of the sites (default: %(default)s)")
    p.add_argument("--health-slo", default="", metavar="ttft_p99_ms=MS,error_rate=F",
                   help="what each updated site's probes must meet (default: ttft_p99_ms=5000,error_rate=0)")
    p.add_argument("--probe", type=Path, default=None,
                   help="probe prompts, one per line (default: four built in)")
    p.add_argument("--min-agreement", type=float, default=None, metavar="F",
                   help="also require the new model's greedy answers to share this much of their text "
                        "with the old model's (0..1)")
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("simulate", help="a fleet at scale in simulated time: latency by region, residency, "
                                        "cost, a site failing")
    add_simulate_args(p)
    p.set_defaults(func=cmd_simulate)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from llmscale.cluster.gateway import Gateway, create_gateway_app
    from llmscale.cluster.sites import load_fleet

    fleet = load_fleet(args.sites)
    log_dir = args.log_dir or cache_root() / "edge-logs"
    gateway = Gateway(fleet, emulate_links=args.emulate_links, served_model_name=args.served_model_name,
                      log_dir=log_dir, start_timeout_s=args.start_timeout, seed=args.seed,
                      hardware_file=args.hardware)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # uvicorn handles them; this keeps the exit clean
    try:
        gateway.start()
        app = create_gateway_app(gateway, args.api_key)
        status(f"llmscale edge serve: {len(fleet.sites)} site(s) on http://{args.host}:{args.port}")
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")).run()
    finally:
        gateway.close()
    status("llmscale edge serve: stopped")


def _call(method: str, url: str, api_key: str | None, body: dict[str, Any] | None = None) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.request(method, url, json=body, headers=headers, timeout=30, trust_env=False)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach the gateway at {url}: {e}") from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text.strip() or f"HTTP {r.status_code}"
        raise ConfigError(message)
    return r.json()


def cmd_status(args: argparse.Namespace) -> None:
    import json

    data = _call("GET", f"{args.url}/edge/status", args.api_key)
    if args.json:
        print(json.dumps(data, indent=2))
        return
    print_status(data)


def print_status(data: dict[str, Any]) -> None:
    from rich.table import Table

    console = stdout_console()
    t = Table(title=f"sites behind {data['model']}")
    numbers = ("load", "served", "failed", "bytes in", "bytes out", "$/h")
    for col in ("site", "kind", "jurisdiction", "state", "model", "pids", *numbers):
        t.add_column(col, justify="right" if col in numbers else "left")
    for s in data["sites"]:
        t.add_row(s["name"], s["kind"], s["jurisdiction"], s["state"], s["model"] or "-",
                  ",".join(map(str, s["pids"])) or "-", f"{s['inflight']}/{s['capacity']}", str(s["served"]),
                  str(s["failed"]), fmt_bytes(s["bytes_in"]), fmt_bytes(s["bytes_out"]),
                  f"{s['cost_per_hour']:g}")
    console.print(t)
    moved = [link for link in data["links"] if link["bytes_up"] or link["bytes_down"] or link["down"]]
    if moved:
        t = Table(title="links that carried traffic or are cut")
        for col in ("from", "to", "rtt ms", "state", "bytes up", "bytes down"):
            t.add_column(col)
        for link in moved:
            t.add_row(link["from"], link["to"], f"{link['rtt_ms']:g}", "cut" if link["down"] else "up",
                      fmt_bytes(link["bytes_up"]), fmt_bytes(link["bytes_down"]))
        console.print(t)
    rollout = data.get("rollout")
    if rollout:
        console.print(f"rollout of {rollout['model']}: {rollout['state']}", markup=False)
        for line in rollout["log"]:
            console.print(f"  {line['t']:8.2f} s  {line['message']}", markup=False)


def cmd_link(args: argparse.Namespace) -> None:
    body = {"site": args.site, "from": args.access, "up": args.up}
    _call("POST", f"{args.url}/edge/links", args.api_key, body)
    where = f" from {args.access}" if args.access else ""
    stdout_console().print(f"{args.site}: link{where} {'restored' if args.up else 'cut'}", markup=False)


def cmd_rollout(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"model": os.path.abspath(args.model), "waves": args.waves,
                            "health_slo": args.health_slo, "min_agreement": args.min_agreement}
    if args.sites is not None:
        from llmscale.cluster.sites import load_fleet

        fleet = load_fleet(args.sites)
        body["sites"] = [s.name for s in fleet.sites.values() if s.kind == "edge" and s.start == "local"]
    if args.probe is not None:
        try:
            body["probes"] = [line for line in args.probe.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise ConfigError(f"--probe {args.probe}: {e.strerror or e}") from None
    _call("POST", f"{args.url}/edge/rollout", args.api_key, body)
    console = stdout_console()
    shown = 0
    while True:
        rollout = _call("GET", f"{args.url}/edge/status", args.api_key)["rollout"]
        for line in rollout["log"][shown:]:
            console.print(f"{line['t']:8.2f} s  {line['message']}", markup=False)
        shown = len(rollout["log"])
        if rollout["state"] != "running":
            break
        time.sleep(0.5)
    if rollout["state"] != "done":
        sys.exit(1)


def cmd_simulate(args: argparse.Namespace) -> None:
    from llmscale.cluster.edge_sim import cmd_simulate as run

    run(args)
