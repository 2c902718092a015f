"""Time to first token of the first request after the main model scaled to zero: no mitigation,
a fallback model, a warm pool.

    python benchmarks/scale_from_zero.py [--fallback-model PATH] [--repeats 3] [--out results/scale-from-zero]

Each setup is one `llmscale cluster serve` on 127.0.0.1 (replicas of 1 CPU, the default model in
fp32). Per repeat it waits until the main deployment has no replica ready (for the warm pool: one
ready), sends one streamed completion and times its first token at the client, noting which
replica answered (`x-llmscale-replica`).

  cold       --min-replicas 0 --max-replicas 1: the request waits for a replica to start
  fallback   the same with --fallback-model (by default an int4 copy from `llmscale quantize`,
             made first into --out): the warm fallback answers while the main replica starts
  warm-pool  --min-replicas 1 --max-replicas 1: a replica is always up (and always paid for)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.table import Table

from llmscale.console import stdout_console
from llmscale.serve.process import free_port, stop_server, wait_ready

ENGINE = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", "256MiB",
          "--replica-cpus", "1", "--scale-to-zero-after-s", "2", "--downscale-delay-s", "1",
          "--upscale-delay-s", "0"]
console = stdout_console()


def main_ready(url: str) -> int:
    status = httpx.get(f"{url}/cluster/status", timeout=10, trust_env=False).json()
    return status["autoscaler"]["ready_replicas"]


def ingress_sees(url: str, ready: int) -> bool:
    """The ingress routes by the board snapshot it polls; its /metrics show that snapshot."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    return any(line.startswith("llmscale:autoscaler_ready_replicas{") and line.endswith(f" {ready}.0")
               for line in text.splitlines())


def fallback_ready(url: str) -> bool:
    replicas = httpx.get(f"{url}/cluster/status", timeout=10, trust_env=False).json()["replicas"]
    return any(r["replica_id"] == "fallback" and r["state"] == "ready" for r in replicas)


def first_token(url: str, i: int) -> tuple[float, str]:
    start = time.monotonic()
    body = {"prompt": f"Question {i}: what is the capital of France?", "max_tokens": 4, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300, trust_env=False) as r:
        replica = r.headers.get("x-llmscale-replica", "?")
        for line in r.iter_lines():
            if line.startswith("data: {") and any(c.get("text") for c in json.loads(line[6:])["choices"]):
                return time.monotonic() - start, replica
    raise SystemExit("the request streamed no token")


def wait_until(ok: object, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def run_setup(name: str, flags: list[str], warm: bool, args: argparse.Namespace) -> list[tuple[float, str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(args.out / f"{name}.log", "wb") as log:
        cmd = [sys.executable, "-m", "llmscale.cli", "cluster", "serve", "--port", str(port), *ENGINE, *flags]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, proc)
            results = []
            want = 1 if warm else 0
            for i in range(args.repeats):
                wait_until(lambda: main_ready(url) == want, f"{want} main replica(s) ready")
                wait_until(lambda: ingress_sees(url, want), "the ingress to see it")
                if "--fallback-model" in flags:
                    wait_until(lambda: fallback_ready(url), "the fallback replica")
                results.append(first_token(url, i))
            return results
        finally:
            stop_server(proc, grace_s=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fallback-model", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("results/scale-from-zero"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fallback = args.fallback_model
    if fallback is None:
        fallback = str(args.out / "ckpt-int4")
        if not (Path(fallback) / "config.json").exists():
            subprocess.run([sys.executable, "-m", "llmscale.cli", "quantize", "--method", "int4",
                            "--out", fallback], check=True, capture_output=True)
    to_zero = ["--min-replicas", "0", "--max-replicas", "1"]
    setups = [("cold", to_zero, False), ("fallback", [*to_zero, "--fallback-model", fallback], False),
              ("warm-pool", ["--min-replicas", "1", "--max-replicas", "1"], True)]
    table = Table(title="first token of the first request after scale to zero (client-side, seconds)")
    for col in ("setup", "runs", "median s", "min-max s", "answered by"):
        table.add_column(col, justify="left" if col in ("setup", "answered by") else "right")
    summary = {}
    for name, flags, warm in setups:
        console.print(f"{name}: cluster serve {' '.join(flags)}")
        runs = run_setup(name, flags, warm, args)
        seconds = [s for s, _ in runs]
        summary[name] = [{"seconds": s, "replica": r} for s, r in runs]
        table.add_row(name, str(len(runs)), f"{statistics.median(seconds):.2f}",
                      f"{min(seconds):.2f}-{max(seconds):.2f}", ", ".join(sorted({r for _, r in runs})))
    console.print(table)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"wrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
