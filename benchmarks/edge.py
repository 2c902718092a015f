"""The local three-site demo of `llmscale edge serve`, measured: placement, bytes, failover.

    python benchmarks/edge.py [--num-prompts 24] [--request-rate 2] [--quick] [--out results/edge]
                              [--parts placement,sensors,failover]

Three real sites on this machine behind emulated links (the gateway's user-space proxies):
edge-munich (DE) and edge-paris (FR) serve the built-in SmolLM2-135M with its Q4_1 weights kept
quantized (int4 kernels), 4 requests at once each; cloud-frankfurt (DE) serves the same model
dequantized to fp32, 16 at once. Costs are the sites file's (`SITES` below).

1. Placement. For each user location (Munich, Paris, Vienna, Madrid) and each policy (edge
   only: `x-llmscale-site-kind: edge`; cloud only: `cloud`; hybrid: no restriction), one
   `llmscale bench serve` run of the same workload (--num-prompts at --request-rate, prompts of
   128 tokens, 32 output tokens) with the user's `x-llmscale-user-location`. TTFT and E2E
   p50/p99, which sites served it, the cost per 1M output tokens of the sites the policy keeps
   (their $/h over the run's span) and the bytes that crossed inter-site links.
2. Sensors. Users at the Munich site send 1,500-token prompts ("readings", 0.25 req/s) and get
   8 tokens back, once kept at the edge and once sent to the cloud: bytes on each link.
3. Failover. Munich users load the fleet; edge-munich's links are cut mid-run: how long until
   the gateway takes it out, how many requests failed, and where the rest went.

Writes to --out: the gateway's log, each bench run's results.json, summary.json and edge.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from llmscale.console import stdout_console
from llmscale.serve.process import free_port

SITES = """
ttft_ms: 1500
sites:
  - {name: edge-munich, kind: edge, location: {lat: 48.14, lon: 11.58}, jurisdiction: DE, max_num_seqs: 4,
     cost_per_hour: 0.40, start: local, engine_args: [--keep-quantized, --max-model-len, "2048"]}
  - {name: edge-paris, kind: edge, location: {lat: 48.86, lon: 2.35}, jurisdiction: FR, max_num_seqs: 4,
     cost_per_hour: 0.40, start: local, engine_args: [--keep-quantized, --max-model-len, "2048"]}
  - {name: cloud-frankfurt, kind: cloud, location: {lat: 50.11, lon: 8.68}, jurisdiction: DE,
     max_num_seqs: 16, cost_per_hour: 4.00, start: local,
     engine_args: [--dtype, float32, --max-model-len, "2048"]}
"""
USERS = {"Munich": "48.14,11.58", "Paris": "48.86,2.35", "Vienna": "48.21,16.37", "Madrid": "40.42,-3.70"}
POLICIES = {"edge only": "edge", "cloud only": "cloud", "hybrid": None}
SITE_KIND = {"edge-munich": "edge", "edge-paris": "edge", "cloud-frankfurt": "cloud"}
SENSOR_RATE = 0.25  # req/s: what one edge site keeps up with at 1,500-token prompts on this machine
SITE_COST = {"edge-munich": 0.40, "edge-paris": 0.40, "cloud-frankfurt": 4.00}


def status(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/edge/status", timeout=30, trust_env=False).json()


def link_bytes(st: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(link["from"], link["to"]): link["bytes_up"] + link["bytes_down"] for link in st["links"]}


def served(st: dict[str, Any]) -> dict[str, int]:
    return {s["name"]: s["served"] for s in st["sites"]}


SEEDS = itertools.count(1)  # every run its own prompts: the sites' prefix caches would serve repeats


def bench(url: str, out: Path, headers: dict[str, str], n: int, rate: float, prompt: int, output: int
          ) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmscale.cli", "-q", "bench", "serve", "--base-url", url, "--num-prompts",
           str(n), "--request-rate", str(rate), "--prompt-len", f"fixed:{prompt}", "--output-len",
           f"fixed:{output}", "--warmup", "1", "--seed", str(next(SEEDS)), "--out", str(out)]
    for k, v in headers.items():
        cmd += ["--header", f"{k}:{v}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["runs"][0]


def measured(url: str, out: Path, headers: dict[str, str], n: int, rate: float, prompt: int, output: int,
             policy_sites: list[str]) -> dict[str, Any]:
    """One bench run and what it moved: latency, sites used, inter-site bytes, cost per 1M tokens."""
    before = status(url)
    run = bench(url, out, headers, n, rate, prompt, output)
    after = status(url)
    b0, b1 = link_bytes(before), link_bytes(after)
    moved = {k: b1[k] - b0.get(k, 0) for k in b1 if b1[k] - b0.get(k, 0)}
    s0, s1 = served(before), served(after)
    summary = run["summary"]
    tokens = summary["output_tokens"]
    cost = sum(SITE_COST[s] for s in policy_sites) * summary["duration_s"] / 3600
    return {"ttft_ms": summary["ttft_ms"], "e2e_ms": summary["e2e_ms"], "completed": summary["completed"],
            "failed": summary["failed"], "sites": {k: s1[k] - s0[k] for k in s1 if s1[k] - s0[k]},
            "bytes_inter_site": sum(v for (a, b), v in moved.items() if a != b),
            "bytes_access": sum(v for (a, b), v in moved.items() if a == b),
            "links": {f"{a}->{b}": v for (a, b), v in moved.items()},
            "cost_per_1m_output_tokens": cost / tokens * 1e6 if tokens else None}


def warm(url: str, out: Path) -> None:
    """Every site's first requests (kernels, caches, connections) before anything is timed."""
    for kind in ("edge", "cloud"):
        for user in ("Munich", "Paris"):
            headers = {"x-llmscale-user-location": USERS[user], "x-llmscale-site-kind": kind}
            for prompt in (128, 1500):
                bench(url, out / "warm-up", headers, 4, 4.0, prompt, 8)


def placement(url: str, out: Path, n: int, rate: float) -> list[dict[str, Any]]:
    rows = []
    for policy, kind in POLICIES.items():
        sites = [s for s, k in SITE_KIND.items() if kind is None or k == kind]
        for user, where in USERS.items():
            headers = {"x-llmscale-user-location": where}
            if kind:
                headers["x-llmscale-site-kind"] = kind
            row = measured(url, out / f"{policy.replace(' ', '-')}-{user}", headers, n, rate, 128, 32, sites)
            rows.append({"policy": policy, "user": user, **row})
            print(f"{policy:10} {user:7} TTFT p50 {row['ttft_ms']['p50']:.0f} ms  sites {row['sites']}",
                  file=sys.stderr)
    return rows


def sensors(url: str, out: Path, n: int) -> list[dict[str, Any]]:
    rows = []
    for policy, kind in (("at the edge", "edge"), ("to the cloud", "cloud")):
        headers = {"x-llmscale-user-location": USERS["Munich"], "x-llmscale-site-kind": kind}
        sites = [s for s, k in SITE_KIND.items() if k == kind]
        row = measured(url, out / f"sensors-{kind}", headers, n, SENSOR_RATE, 1500, 8, sites)
        rows.append({"policy": policy, **row})
    return rows


def failover(url: str, out: Path, n: int, rate: float) -> dict[str, Any]:
    """Munich users under load; edge-munich cut a third of the way in."""
    cmd = [sys.executable, "-m", "llmscale.cli", "-q", "bench", "serve", "--base-url", url, "--num-prompts",
           str(n), "--request-rate", str(rate), "--prompt-len", "fixed:128", "--output-len", "fixed:32",
           "--warmup", "0", "--seed", str(next(SEEDS)), "--header",
           f"x-llmscale-user-location:{USERS['Munich']}", "--out", str(out)]
    before = status(url)
    load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    time.sleep(n / rate / 3)
    httpx.post(f"{url}/edge/links", json={"site": "edge-munich", "up": False}, timeout=10, trust_env=False)
    cut = time.monotonic()
    while next(s for s in status(url)["sites"] if s["name"] == "edge-munich")["state"] != "down":
        time.sleep(0.05)
    detected = time.monotonic() - cut
    load.wait()
    httpx.post(f"{url}/edge/links", json={"site": "edge-munich", "up": True}, timeout=10, trust_env=False)
    after = status(url)
    summary = json.loads((out / "results.json").read_text())["runs"][0]["summary"]
    delta = {s["name"]: (s["served"], s["failed"]) for s in after["sites"]}
    for s in before["sites"]:
        delta[s["name"]] = (delta[s["name"]][0] - s["served"], delta[s["name"]][1] - s["failed"])
    return {"detected_down_s": detected, "completed": summary["completed"], "failed": summary["failed"],
            "sites": {k: {"served": v[0], "failed attempts": v[1]} for k, v in delta.items() if any(v)},
            "ttft_ms": summary["ttft_ms"]}


def report(rows: list[dict[str, Any]], sensor_rows: list[dict[str, Any]], fail: dict[str, Any] | None,
           out: Path) -> None:
    console = stdout_console()
    t = Table(title="placement by user location (128-token prompts, 32 output tokens)")
    for col in ("policy", "user", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99", "served by",
                "inter-site bytes", "$/1M out"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["policy"], r["user"], f"{r['ttft_ms']['p50']:.0f}", f"{r['ttft_ms']['p99']:.0f}",
                  f"{r['e2e_ms']['p50']:.0f}", f"{r['e2e_ms']['p99']:.0f}",
                  ", ".join(f"{k} {v}" for k, v in r["sites"].items()), f"{r['bytes_inter_site']:,}",
                  f"{r['cost_per_1m_output_tokens']:.2f}")
    console.print(t)
    t = Table(title="sensors near Munich (1,500-token prompts, 8 output tokens)")
    for col in ("policy", "TTFT p50", "E2E p50", "access-link bytes", "inter-site bytes", "$/1M out"):
        t.add_column(col)
    for r in sensor_rows:
        t.add_row(r["policy"], f"{r['ttft_ms']['p50']:.0f}", f"{r['e2e_ms']['p50']:.0f}",
                  f"{r['bytes_access']:,}", f"{r['bytes_inter_site']:,}",
                  f"{r['cost_per_1m_output_tokens']:.2f}")
    console.print(t)
    if fail is not None:
        console.print(f"failover: edge-munich cut, taken out after {fail['detected_down_s']:.2f} s; "
                      f"{fail['completed']} completed, {fail['failed']} failed; served by {fail['sites']}",
                      markup=False)
    if rows:
        plot(rows, out / "edge.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.27
    for i, policy in enumerate(POLICIES):
        xs = [j + (i - 1) * width for j in range(len(USERS))]
        ys = [next(r["ttft_ms"]["p50"] for r in rows if r["policy"] == policy and r["user"] == u)
              for u in USERS]
        ax.bar(xs, ys, width, label=policy)
    ax.set_xticks(range(len(USERS)), list(USERS))
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("edge serve: TTFT by user location and placement policy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--request-rate", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="4 requests per run: checks the script end to end")
    ap.add_argument("--out", type=Path, default=Path("results/edge"))
    ap.add_argument("--parts", default="placement,sensors,failover",
                    help="which measurements to run (default: %(default)s)")
    args = ap.parse_args()
    n = 4 if args.quick else args.num_prompts
    args.out.mkdir(parents=True, exist_ok=True)
    sites = args.out / "sites.yaml"
    sites.write_text(SITES)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(args.out / "gateway.log", "wb")  # noqa: SIM115
    gateway = subprocess.Popen([sys.executable, "-m", "llmscale.cli", "edge", "serve", "--sites", str(sites),
                                "--port", str(port), "--log-dir", str(args.out / "site-logs")],
                               stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if all(s["state"] == "healthy" and s["model"] for s in status(url)["sites"]):
                    break
            except httpx.HTTPError:
                pass
            if gateway.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the gateway did not come up; see {args.out / 'gateway.log'}")
            time.sleep(1)
        parts = set(args.parts.split(","))
        warm(url, args.out)
        rows = placement(url, args.out, n, args.request_rate) if "placement" in parts else []
        sensor_rows = sensors(url, args.out, max(4, n // 3)) if "sensors" in parts else []
        fail = failover(url, args.out / "failover", 2 * n, args.request_rate) if "failover" in parts else None
        (args.out / "summary.json").write_text(json.dumps(
            {"placement": rows, "sensors": sensor_rows, "failover": fail}, indent=2))
        report(rows, sensor_rows, fail, args.out)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(120)


if __name__ == "__main__":
    main()
