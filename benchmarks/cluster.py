"""The same `llmscale bench serve` load against one engine and against `llmscale cluster serve`.

    python benchmarks/cluster.py [--systems serve,cluster-1x2,cluster-prefix,cluster-pow2,cluster-round-robin]
                                 [--num-prompts 48] [--request-rate 1.5] [--quick] [--out results/cluster]

Each system is started here on 127.0.0.1 on a free port, waited for, sent one run of the same
prefix-share workload by `llmscale bench serve` (by default 48 requests at 1.5 req/s, Poisson,
each one of 4 shared system prompts of 256 tokens plus 32 more prompt tokens, 32 output tokens:
the same prompts, lengths and arrival times for every system), then stopped (SIGTERM, its port
checked free) before the next starts, so the systems never share the cores. All serve the
built-in model (or --model) with `--dtype float32 --max-model-len 1024` and `--kv-cache-memory`.

  serve                `llmscale serve`: one engine on both cores, no Ray; the baseline
  cluster-1x2          `llmscale cluster serve --num-replicas 1 --replica-cpus 2 --router prefix`:
                       the same single engine behind Ray Serve's proxy, ingress and router
  cluster-prefix       2 replicas of 1 CPU each (`--num-replicas 2 --replica-cpus 1`), routed to
                       the replica whose prefix cache holds the prompt, bounded by load
  cluster-pow2         2 x 1 CPU, the less loaded of two random replicas
  cluster-round-robin  2 x 1 CPU, round-robin

After its run each system is asked how the load spread: a cluster's /cluster/status gives each
replica's requests served (warm-up included) and prefix hit rate; `serve`'s /metrics the same
for its one engine. `serve` and `cluster-1x2` then get a routing-overhead phase: sequential
non-streamed one-token completions of "hi" (after one unmeasured request); the cluster's median
minus serve's is what the Ray path adds to a request.

Writes to --out: each server's log (<system>.log), each bench run (<system>/results.json, its
PNGs and bench.log), summary.json and cluster.png (goodput and TTFT p50/p99 per system).
`--quick` (8 requests at 4 req/s, no warm-up, 10 overhead requests) checks the script end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from llmscale.bench.arrivals import parse_rates
from llmscale.bench.lengths import parse_length
from llmscale.bench.metrics import parse_slo, percentile
from llmscale.config import ConfigError
from llmscale.console import stdout_console

SYSTEMS = ("serve", "cluster-1x2", "cluster-prefix", "cluster-pow2", "cluster-round-robin")
CLUSTERS = {  # system -> (replicas, CPUs per replica, router)
    "cluster-1x2": (1, 2, "prefix"),
    "cluster-prefix": (2, 1, "prefix"),
    "cluster-pow2": (2, 1, "pow2"),
    "cluster-round-robin": (2, 1, "round-robin"),
}
OVERHEAD_SYSTEMS = ("serve", "cluster-1x2")  # one engine on both cores, with and without Ray
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "1024"]
QUICK = {"num_prompts": 8, "request_rate": "4", "warmup": 0, "overhead_requests": 10}
STOP_TIMEOUT_S = 120.0  # a cluster drains, then stops Ray: tens of seconds on 2 cores
PORT_FREE_TIMEOUT_S = 30.0
STATUS_SETTLE_S = 5.0  # replicas report once a second; the last requests may not be counted yet

console = stdout_console()


@dataclass
class Outcome:
    """What one system did: its bench summary, how its replicas shared the load, its overhead."""

    system: str
    command: list[str]
    startup_s: float | None = None
    summary: dict[str, Any] | None = None  # the bench run's summary, as in its results.json
    # Per replica after the workload: replica_id, state, requests_served, prefix_hit_rate.
    replicas: list[dict[str, Any]] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)  # end-to-end latency of each "hi"
    error: str | None = None


# --- servers ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_cmd(system: str, port: int, model: str | None, kv_cache_memory: str) -> list[str]:
    cmd = [sys.executable, "-m", "llmscale.cli"]
    if system in CLUSTERS:
        replicas, cpus, router = CLUSTERS[system]
        cmd += ["cluster", "serve", "--num-replicas", str(replicas), "--replica-cpus", str(cpus),
                "--router", router]
    else:
        cmd += ["serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS, "--kv-cache-memory", kv_cache_memory]
    return cmd + (["--model", model] if model else [])


def is_ready(client: httpx.Client, url: str, system: str) -> bool:
    """`serve`: /health answers 200. A cluster: /cluster/status lists every replica ready (the
    proxy answers before the replicas have loaded their engines)."""
    try:
        if system not in CLUSTERS:
            return client.get(f"{url}/health").status_code == 200
        r = client.get(f"{url}/cluster/status")
        if r.status_code != 200:
            return False
        ready = [rep for rep in r.json()["replicas"] if rep["state"] == "ready"]
        return len(ready) == CLUSTERS[system][0]
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def wait_ready(proc: subprocess.Popen[bytes], url: str, system: str, timeout_s: float) -> float:
    start = time.monotonic()
    with httpx.Client(timeout=5, trust_env=False) as client:
        while time.monotonic() - start < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode} while starting")
            if is_ready(client, url, system):
                return time.monotonic() - start
            time.sleep(1)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s")


def port_listening(port: int) -> bool:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return any(line.split()[3].rpartition(":")[2] == str(port) for line in out.splitlines() if line.strip())


def stop(proc: subprocess.Popen[bytes], port: int) -> bool:
    """SIGTERM (a cluster drains, then stops the Ray it started), up to STOP_TIMEOUT_S, then the
    whole process group is killed. True once nothing listens on the port any more."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]still running {STOP_TIMEOUT_S:.0f} s after SIGTERM: killing it[/yellow]")
    # Its own session: whatever of it outlived the main process (Ray's workers) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + PORT_FREE_TIMEOUT_S
    while port_listening(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


# --- measurements ----------------------------------------------------------------------------

def bench_cmd(url: str, system: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "llmscale.cli", "bench", "serve", "-q", "--base-url", url, "--label", system,
           "--dataset", "prefix-share", "--num-prefixes", str(args.num_prefixes),
           "--prefix-len", str(args.prefix_len), "--prompt-len", args.prompt_len,
           "--output-len", args.output_len, "--num-prompts", str(args.num_prompts),
           "--request-rate", args.request_rate, "--seed", str(args.seed), "--warmup", str(args.warmup),
           "--slo", args.slo, "--out", str(args.out / system)]
    if args.model and Path(args.model).is_dir():  # a GGUF's tokenizer: the built-in one sizes prompts
        cmd += ["--tokenizer", args.model]
    return cmd


def run_bench(url: str, system: str, args: argparse.Namespace) -> dict[str, Any]:
    """The bench run's summary from its results.json; its own output goes to bench.log."""
    out = args.out / system
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.log", "wb") as log:
        rc = subprocess.run(bench_cmd(url, system, args), stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"bench serve exited with status {rc} (log: {out / 'bench.log'})")
    runs = json.loads((out / "results.json").read_text())["runs"]
    if not runs:
        raise RuntimeError("bench serve measured nothing")
    summary: dict[str, Any] = runs[0]["summary"]
    return summary


def cluster_replicas(client: httpx.Client, url: str, expected_served: int) -> list[dict[str, Any]]:
    """Each replica's requests served and prefix hit rate, once the reports count `expected_served`
    requests (or after STATUS_SETTLE_S, taking what they say)."""
    deadline = time.monotonic() + STATUS_SETTLE_S
    while True:
        replicas = client.get(f"{url}/cluster/status").raise_for_status().json()["replicas"]
        served = sum(r["requests_served"] for r in replicas)
        if served >= expected_served or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    keys = ("replica_id", "state", "requests_served", "prefix_hit_rate")
    return [{k: r[k] for k in keys} for r in replicas]


def engine_replica(client: httpx.Client, url: str) -> list[dict[str, Any]]:
    """`serve`'s one engine, read from /metrics: finished requests and prefix hit rate."""
    samples = {s.name: s.value for family in text_string_to_metric_families(
        client.get(f"{url}/metrics").raise_for_status().text) for s in family.samples}
    return [{"replica_id": "engine", "state": "ready",
             "requests_served": int(samples["llmscale:e2e_request_latency_seconds_count"]),
             "prefix_hit_rate": samples["llmscale:prefix_cache_hit_rate"]}]


def load_spread(url: str, system: str, expected_served: int) -> list[dict[str, Any]]:
    with httpx.Client(timeout=10, trust_env=False) as client:
        if system in CLUSTERS:
            return cluster_replicas(client, url, expected_served)
        return engine_replica(client, url)


def overhead(url: str, n: int) -> list[float]:
    """End-to-end ms of n sequential one-token completions of "hi", after one left out (the
    first request through a fresh path pays for connections and lazy set-up)."""
    with httpx.Client(timeout=60, trust_env=False) as client:
        model = client.get(f"{url}/v1/models").raise_for_status().json()["data"][0]["id"]
        body = {"model": model, "prompt": "hi", "max_tokens": 1, "stream": False}
        client.post(f"{url}/v1/completions", json=body).raise_for_status()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            client.post(f"{url}/v1/completions", json=body).raise_for_status()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def measure(o: Outcome, url: str, proc: subprocess.Popen[bytes], args: argparse.Namespace) -> None:
    """Start-up, the workload, the load spread and (for some systems) the overhead, into `o`."""
    console.print(f"{o.system}: starting")
    o.startup_s = wait_ready(proc, url, o.system, args.startup_timeout)
    console.print(f"{o.system}: ready in {o.startup_s:.0f} s; {args.num_prompts} requests "
                  f"(+{args.warmup} warm-up) at {args.request_rate} req/s")
    o.summary = run_bench(url, o.system, args)
    o.replicas = load_spread(url, o.system, args.warmup + o.summary["completed"])
    if o.system in OVERHEAD_SYSTEMS and args.overhead_requests > 0:
        console.print(f"{o.system}: {args.overhead_requests} sequential one-token requests")
        o.overhead_ms = overhead(url, args.overhead_requests)


def run_system(system: str, args: argparse.Namespace) -> tuple[Outcome, bool]:
    """One system from start to stop; the flag says whether its port came free afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    o = Outcome(system, server_cmd(system, port, args.model, args.kv_cache_memory))
    log_path = args.out / f"{system}.log"
    with open(log_path, "wb") as log:
        # Its own session: Ctrl-C reaches only this script, which then stops the server in order.
        proc = subprocess.Popen(o.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            measure(o, url, proc, args)
        except (RuntimeError, httpx.HTTPError) as e:
            o.error = str(e)
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            console.print(f"[red]{system} failed: {e}[/red] (log: {log_path})\n{tail}")
        finally:
            t = time.monotonic()
            freed = stop(proc, port)
            console.print(f"{system}: stopped in {time.monotonic() - t:.0f} s")
    if not freed:
        console.print(f"[red]{system}: port {port} still in use after stopping; not starting another[/red]")
    return o, freed


# --- report ----------------------------------------------------------------------------------

def ms_pair(stats: dict[str, Any] | None, a: str, b: str) -> str:
    if not stats:
        return "—"
    return "/".join("—" if stats.get(k) is None else f"{stats[k]:.0f}" for k in (a, b))


def added_p50(o: Outcome, baseline: Outcome | None) -> float | None:
    """What the Ray path adds to a request: o's median "hi" latency minus serve's."""
    if baseline is None or o is baseline or not o.overhead_ms or not baseline.overhead_ms:
        return None
    return percentile(o.overhead_ms, 50) - percentile(baseline.overhead_ms, 50)


def overhead_cells(o: Outcome, baseline: Outcome | None) -> list[str]:
    if not o.overhead_ms:
        return ["—", "—"]
    added = added_p50(o, baseline)
    return [f"{percentile(o.overhead_ms, 50):.1f}/{percentile(o.overhead_ms, 90):.1f}",
            "—" if added is None else f"{added:+.1f}"]


def number(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def row(o: Outcome, baseline: Outcome | None) -> list[str]:
    s = o.summary
    if s is None:
        return [f"{o.system} [red](failed)[/red]", *["—"] * 12]
    bench = [f"{o.startup_s:.0f}", f"{s['completed']}/{s['failed']}", f"{s['request_throughput']:.2f}",
             f"{s['output_throughput']:.1f}", ms_pair(s["ttft_ms"], "p50", "p99"),
             ms_pair(s["tpot_ms"], "p50", "p99"), number(s.get("goodput"), ".2f"),
             number(s.get("slo_attainment"), ".0%")]
    spread = ["/".join(str(r["requests_served"]) for r in o.replicas) or "—",
              "/".join(f"{r['prefix_hit_rate']:.0%}" for r in o.replicas) or "—"]
    return [o.system, *bench, *spread, *overhead_cells(o, baseline)]


def table(outcomes: list[Outcome], args: argparse.Namespace) -> Table:
    t = Table(title=f"cluster: {args.num_prompts} prefix-share requests at {args.request_rate} req/s "
                    f"({args.num_prefixes} prefixes of {args.prefix_len} + {args.prompt_len} prompt, "
                    f"{args.output_len} output), SLO {args.slo}",
              caption="served, prefix hits: per replica, read after the workload (warm-up included); "
                      "added: median \"hi\" latency minus serve's")
    columns = ("system", "start\ns", "ok/\nfailed", "req/s", "output\ntok/s", "TTFT ms\np50/p99",
               "TPOT ms\np50/p99", "goodput\nreq/s", "SLO\nmet", "served\nper replica", "prefix\nhits",
               "\"hi\" ms\np50/p90", "added\nms")
    for c in columns:
        t.add_column(c, justify="left" if c == "system" else "right", no_wrap=True)
    baseline = next((o for o in outcomes if o.system == "serve"), None)
    for o in outcomes:
        t.add_row(*row(o, baseline))
    return t


def plot(outcomes: list[Outcome], path: Path, slo: dict[str, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file only, no display
    import matplotlib.pyplot as plt

    done = [o for o in outcomes if o.summary]
    xs = list(range(len(done)))
    summaries = [o.summary or {} for o in done]
    fig, (ax_good, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = ax_good.bar(xs, [s.get("goodput") or 0.0 for s in summaries], color="C2")  # C0/C1: TTFT
    ax_good.bar_label(bars, fmt="%.2f", fontsize=8)
    ax_good.set_ylabel("goodput (req/s within the SLOs)")
    width = 0.38
    for shift, q in ((-width / 2, "p50"), (width / 2, "p99")):
        ax_ttft.bar([x + shift for x in xs], [s["ttft_ms"].get(q) or 0.0 for s in summaries], width,
                    label=f"TTFT {q}")
    if "ttft_ms" in slo:
        ax_ttft.axhline(slo["ttft_ms"], color="red", lw=0.8, ls=":", label="SLO")
    ax_ttft.set_ylabel("TTFT (ms)")
    ax_ttft.legend(fontsize=8)
    for ax in (ax_good, ax_ttft):
        ax.set_xticks(xs, [o.system for o in done], rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def outcome_json(o: Outcome, baseline: Outcome | None) -> dict[str, Any]:
    doc = asdict(o)
    if o.overhead_ms:
        doc["overhead"] = {"requests": len(o.overhead_ms), "p50_ms": percentile(o.overhead_ms, 50),
                           "p90_ms": percentile(o.overhead_ms, 90), "added_p50_ms": added_p50(o, baseline)}
    return doc


def write_summary(outcomes: list[Outcome], args: argparse.Namespace) -> Path:
    baseline = next((o for o in outcomes if o.system == "serve"), None)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = {"config": config, "engine_flags": ENGINE_FLAGS,
           "systems": {o.system: outcome_json(o, baseline) for o in outcomes}}
    path = args.out / "summary.json"
    path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    return path


# --- main ------------------------------------------------------------------------------------

def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from " + ",".join(SYSTEMS))
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the built-in SmolLM2-135M)")
    ap.add_argument("--kv-cache-memory", default="256MiB",
                    help="KV cache of each engine (each replica); a small one makes routing matter "
                         "(default: %(default)s)")
    ap.add_argument("--num-prefixes", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--prompt-len", default="fixed:32", help="tokens after the shared prefix")
    ap.add_argument("--output-len", default="fixed:32")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--request-rate", default="1.5", help="req/s, Poisson")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo", default="ttft_ms=2000,tpot_ms=200")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--overhead-requests", type=int, default=30,
                    help="sequential one-token requests for serve and cluster-1x2")
    ap.add_argument("--quick", action="store_true",
                    help="8 requests at 4 req/s, no warm-up, 10 overhead requests: an end-to-end check")
    ap.add_argument("--startup-timeout", type=float, default=600.0, metavar="S")
    ap.add_argument("--out", type=Path, default=Path("results/cluster"))
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    return ap, args


def validate(args: argparse.Namespace) -> list[str]:
    """The systems to run; a bad flag fails here, not after a server has started."""
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if bad := [s for s in systems if s not in SYSTEMS]:
        raise ConfigError(f"--systems: unknown {bad}; choose from {', '.join(SYSTEMS)}")
    parse_length(args.prompt_len, "--prompt-len")
    parse_length(args.output_len, "--output-len")
    parse_rates(args.request_rate, "--request-rate")
    parse_slo(args.slo)
    return systems


def run(systems: list[str], args: argparse.Namespace) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for system in systems:
        try:
            outcome, freed = run_system(system, args)
        except KeyboardInterrupt:
            console.print(f"[yellow]{system}: interrupted; reporting what was measured[/yellow]")
            break
        outcomes.append(outcome)
        if not freed:
            break
    return outcomes


def main() -> None:
    ap, args = parse_args()
    try:
        systems = validate(args)
    except ConfigError as e:
        ap.exit(2, f"cluster.py: error: {e}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    console.print(f"systems: {', '.join(systems)}; logs and results in {args.out}")
    outcomes = run(systems, args)
    if not any(o.summary for o in outcomes):
        console.print("[yellow]nothing was measured[/yellow]")
        return
    t = table(outcomes, args)
    console.print(t)
    summary = write_summary(outcomes, args)
    png = args.out / "cluster.png"
    plot(outcomes, png, parse_slo(args.slo), f"{args.num_prompts} prefix-share requests at "
                                              f"{args.request_rate} req/s on {os.cpu_count()} cores")
    console.print(f"wrote {summary} and {png}")


if __name__ == "__main__":
    main()
