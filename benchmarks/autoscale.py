"""Autoscaling against fixed pools: the same time-varying load on `llmscale cluster serve`
autoscaled to its SLO, on a fixed pool of the maximum, and on a fixed pool of the minimum.

    python benchmarks/autoscale.py [--schedule benchmarks/workloads/workday.csv]
                                   [--slo ttft_ms=2000,tpot_ms=150]
                                   [--max-replicas 2] [--fallback-model PATH] [--quick]
                                   [--out results/autoscale]

Each configuration is started in turn on 127.0.0.1 (two replicas of one CPU at most: this
machine's cores), waited for, sent `llmscale bench serve --rate-schedule SCHEDULE` (by default a
working day compressed into 6 minutes, peaking at 2 req/s: the same prompts, lengths and arrival
times for every configuration), and stopped. During the run /cluster/status is read every second:
the replicas ready and the replica-seconds spent, whose difference over the run (at
`--hardware-cost-per-hour` per replica) is what the configuration cost.

  autoscaled   --min-replicas 0 --max-replicas M, the SLO as its targets, scale to zero after
               --scale-to-zero-after-s idle seconds
  fallback     the same with --fallback-model (only when given): its replica-seconds count too
  fixed-max    --num-replicas M
  fixed-min    --num-replicas 1

Printed: SLO attainment, goodput, TTFT/TPOT p50/p99, replica-seconds and $ per configuration,
and the autoscaled run's replica-seconds against fixed-max's. Written to --out: each
configuration's bench results and server log, summary.json and autoscale.png (replicas ready
over time under the offered rate; attainment against replica-seconds).
`--quick` (steps:0.5x20,2x20 with 5 s delays) checks the script end to end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from llmscale.bench.arrivals import parse_rate_schedule
from llmscale.bench.metrics import parse_slo
from llmscale.console import stdout_console
from llmscale.serve.process import free_port, stop_server, wait_ready

ENGINE = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", "256MiB",
          "--replica-cpus", "1"]
COST_PER_HOUR = 0.05  # per 1-CPU replica: a 2-vCPU cloud VM at ~$0.10/hour, halved
console = stdout_console()


@dataclass
class Outcome:
    name: str
    flags: list[str]
    summary: dict[str, Any] = field(default_factory=dict)
    replica_seconds: float = 0.0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s since the run began, ready)


def configurations(args: argparse.Namespace) -> list[Outcome]:
    slo = parse_slo(args.slo)
    scaled = ["--min-replicas", "0", "--max-replicas", str(args.max_replicas),
              "--target-ttft-ms", f"{slo['ttft_ms']:g}", "--target-tpot-ms", f"{slo['tpot_ms']:g}",
              "--scale-to-zero-after-s", f"{args.scale_to_zero_after_s:g}",
              "--downscale-delay-s", f"{args.downscale_delay_s:g}"]
    out = [Outcome("autoscaled", scaled)]
    if args.fallback_model:
        out.append(Outcome("fallback", [*scaled, "--fallback-model", args.fallback_model]))
    out += [Outcome("fixed-max", ["--num-replicas", str(args.max_replicas)]),
            Outcome("fixed-min", ["--num-replicas", "1"])]
    return out


def status(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/cluster/status", timeout=10, trust_env=False).json()


def held(snapshot: dict[str, Any]) -> float:
    return float(sum(snapshot["spent"]["replica_seconds"].values()))


def ready(snapshot: dict[str, Any]) -> int:
    return sum(1 for r in snapshot["replicas"] if r["state"] == "ready" and r["role"] == "engine")


def run(o: Outcome, args: argparse.Namespace) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(args.out / f"{o.name}.log", "wb")  # noqa: SIM115 (the child holds it)
    cmd = [sys.executable, "-m", "llmscale.cli", "cluster", "serve", "--port", str(port), *ENGINE, *o.flags,
           "--hardware-cost-per-hour", str(COST_PER_HOUR), "--drain-timeout", "5"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc)
        if not o.name.startswith(("autoscaled", "fallback")):  # a fixed pool: every replica up first
            while ready(status(url)) < int(o.flags[1]):
                time.sleep(1)
        start = status(url)
        t0 = time.monotonic()
        done = threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                o.timeline.append((time.monotonic() - t0, ready(status(url))))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        bench = [sys.executable, "-m", "llmscale.cli", "bench", "serve", "--base-url", url,
                 "--rate-schedule", args.schedule, "--prompt-len", args.prompt_len,
                 "--output-len", args.output_len, "--slo", args.slo, "--seed", "0",
                 "--warmup", "0",  # the day starts at midnight with nothing to send
                 "--out", str(args.out / o.name)]
        with open(args.out / f"{o.name}-bench.log", "wb") as blog:
            code = subprocess.run(bench, stdout=blog, stderr=subprocess.STDOUT).returncode
        done.set()
        watcher.join()
        if code:
            raise SystemExit(f"{o.name}: bench serve failed ({code}); see {args.out / f'{o.name}-bench.log'}")
        o.replica_seconds = held(status(url)) - held(start)
        o.summary = json.loads((args.out / o.name / "results.json").read_text())["runs"][0]["summary"]
    finally:
        stop_server(proc, grace_s=60)
        log.close()


def schedule_name(args: argparse.Namespace) -> str:
    """A schedule file by its name (not where this checkout lies), a spec as written."""
    return Path(args.schedule).name if Path(args.schedule).is_file() else args.schedule


def print_table(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    table = Table(title=f"{schedule_name(args)}, SLO {args.slo}: the same requests on each configuration")
    for col in ("configuration", "SLO met", "goodput req/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms",
                "replica-s", "$"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for o in outcomes:
        s = o.summary
        table.add_row(o.name, f"{s['slo_attainment']:.1%}", f"{s['goodput']:.2f}",
                      f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f}",
                      f"{s['tpot_ms']['p50']:.0f} / {s['tpot_ms']['p99']:.0f}",
                      f"{o.replica_seconds:.0f}", f"{o.replica_seconds / 3600 * COST_PER_HOUR:.4f}")
    console.print(table)
    by = {o.name: o for o in outcomes}
    if "autoscaled" in by and "fixed-max" in by and by["fixed-max"].replica_seconds:
        share = by["autoscaled"].replica_seconds / by["fixed-max"].replica_seconds
        console.print(f"autoscaled: {share:.0%} of fixed-max's replica-seconds, "
                      f"{by['autoscaled'].summary['slo_attainment']:.1%} of requests within the SLO")


def plot(outcomes: list[Outcome], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedule = parse_rate_schedule(args.schedule)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    t, xs, ys = 0.0, [], []
    for seconds, rate in schedule.segments:
        xs += [t, t + seconds]
        ys += [rate, rate]
        t += seconds
    rate_ax = left.twinx()
    rate_ax.plot(xs, ys, color="gray", lw=1, label="offered rate")
    rate_ax.set_ylabel("offered rate (req/s)")
    for i, o in enumerate(outcomes):
        left.step([p[0] for p in o.timeline], [p[1] for p in o.timeline], where="post", color=f"C{i}",
                  label=o.name)
    left.set_xlabel("seconds into the run")
    left.set_ylabel("replicas ready")
    left.legend(loc="upper left", fontsize=8)
    for i, o in enumerate(outcomes):
        right.scatter(o.replica_seconds, 100 * o.summary["slo_attainment"], color=f"C{i}", label=o.name, s=40)
    right.set_xlabel("replica-seconds during the run")
    right.set_ylabel("requests within the SLO (%)")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"llmscale cluster serve: autoscaling against fixed pools ({schedule_name(args)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default=str(Path(__file__).parent / "workloads" / "workday.csv"))
    p.add_argument("--slo", default="ttft_ms=2000,tpot_ms=150")
    p.add_argument("--prompt-len", default="uniform:64,256")
    p.add_argument("--output-len", default="uniform:32,96")
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--scale-to-zero-after-s", type=float, default=20.0)
    p.add_argument("--downscale-delay-s", type=float, default=15.0)
    p.add_argument("--fallback-model", default=None)
    p.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("results/autoscale"))
    args = p.parse_args()
    if args.quick:
        args.schedule, args.scale_to_zero_after_s, args.downscale_delay_s = "steps:0.5x20,2x20", 5.0, 5.0
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = configurations(args)
    if args.configs:
        outcomes = [o for o in outcomes if o.name in args.configs.split(",")]
    for o in outcomes:
        console.print(f"{o.name}: cluster serve {' '.join(o.flags)}")
        run(o, args)
    print_table(outcomes, args)
    (args.out / "summary.json").write_text(json.dumps(
        [{"name": o.name, "flags": o.flags, "summary": o.summary, "replica_seconds": o.replica_seconds,
          "cost_usd": o.replica_seconds / 3600 * COST_PER_HOUR, "timeline": o.timeline} for o in outcomes],
        indent=1))
    plot(outcomes, args, args.out / "autoscale.png")
    console.print(f"wrote {args.out / 'summary.json'} and {args.out / 'autoscale.png'}")


if __name__ == "__main__":
    main()
