"""`llmscale cluster coldstart`: where a replica's cold start goes, phase by phase.

It starts a loopback Ray cluster and deploys the cluster application with no replica
(`--min-replicas 0`), sends one streamed request and times its first token. The replica Serve
starts for it reports when its process started, when its constructor ran, the engine's start-up
phases (`LLMEngine.startup_phases`) and when it was ready; set against the request's send time
and first token, the wait splits into:

  ray          the request reaching the autoscaler, Serve placing the replica, its process start
  imports      Python imports and the Ray worker's set-up, up to the replica's constructor
  checkpoint   finding the checkpoint (a GGUF converted once per machine and cached) and tokenizer
  kernels      the C kernels: compiled once per machine and cached, or loaded from the cache
  weights      reading the weights (mmap) and building the model
  prepack      packing fp32 weights for the GEMM, where the engine does
  kv_cache     allocating the KV cache and the runner
  replica      the rest of the constructor (the engine thread, the first report)
  first token  from the replica being ready to the first token at the client: routing the waiting
               request, its prefill (first calls of each kernel at its row counts), streaming

With `--repeats N` the application is deployed N times on the same Ray cluster (Ray's own start
is not counted). `--evict-page-cache` drops the checkpoint's files from the OS page cache before
each (posix_fadvise), so the weights come from the disk as on a machine that just booted.
Prints the phases per run and their median, and writes coldstart.json and coldstart.png (a
stacked bar per run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from llmscale.config import ConfigError

ENGINE_PHASES = ("checkpoint", "kernels", "weights", "prepack", "kv_cache")
PHASES = ("ray", "imports", *ENGINE_PHASES, "replica", "first token")
PROMPT = "The first request after a cold start asks:"


def breakdown(sent_s: float, first_token_s: float, startup: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase (see the module docstring); they add up to the first token's wait."""
    engine = startup["engine_phases"]
    phases = {"ray": startup["process_start_s"] - sent_s,
              "imports": startup["init_start_s"] - startup["process_start_s"],
              **{name: engine.get(name, 0.0) for name in ENGINE_PHASES}}
    in_engine = sum(engine.get(name, 0.0) for name in ENGINE_PHASES)
    phases["replica"] = startup["ready_s"] - startup["init_start_s"] - in_engine
    phases["first token"] = first_token_s - startup["ready_s"]
    return phases


def first_token(url: str, api_key: str | None) -> tuple[float, float]:
    """(send time, first token time), seconds since the epoch, of one streamed completion."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sent = time.time()
    with httpx.stream("POST", f"{url}/v1/completions", headers=headers, timeout=600, trust_env=False,
                      json={"prompt": PROMPT, "max_tokens": 2, "stream": True, "temperature": 0}) as r:
        if r.status_code != 200:
            raise ConfigError(f"the cold request failed: {r.status_code} {r.read()[:200]!r}")
        for line in r.iter_lines():
            if line.startswith("data: {") and any(c.get("text") for c in json.loads(line[6:])["choices"]):
                return sent, time.time()
    raise ConfigError("the cold request streamed no token")


def evict_page_cache(folder: Path) -> int:
    """Ask the OS to drop the folder's files from its page cache; returns their bytes. Pages that
    a running process maps stay cached."""
    total = 0
    for file in folder.iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            total += file.stat().st_size
    return total


def one_cold_start(args: argparse.Namespace, config: Any, url: str) -> dict[str, float]:
    """Deploy with no replica, time one request through a cold start, tear the application down."""
    import ray
    from ray import serve

    from llmscale.cluster.autoscale import AutoscalingOptions
    from llmscale.cluster.board import ENGINE, NAMESPACE, StatusBoard
    from llmscale.cluster.cli import APP_NAME, deploy

    scaling = AutoscalingOptions(min_replicas=0, max_replicas=1)
    board_name = f"board-{uuid.uuid4().hex[:12]}"
    board = StatusBoard.options(name=board_name, namespace=NAMESPACE).remote(scaling.describe())
    try:
        deploy(args, config, board, scaling, board_name)
        if args.evict_page_cache:
            from llmscale.model.lookup import resolve_model

            evict_page_cache(resolve_model(config.model, config.keep_quantized))
        sent, first = first_token(url, args.api_key)
        replicas = ray.get(board.snapshot.remote())["replicas"]
        started = [r["startup"] for r in replicas if r["role"] == ENGINE and r["startup"]]
        if not started:
            raise ConfigError("the replica that served the cold request did not report its start")
        return breakdown(sent, first, started[0])
    finally:
        serve.delete(APP_NAME)
        ray.kill(board)


def cmd_coldstart(args: argparse.Namespace) -> None:
    from llmscale.console import status, stdout_console
    from llmscale.engine_args import EngineArgs
    from llmscale.ray_cluster import connect

    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    config = EngineArgs.from_cli_args(args).create_engine_config()
    cluster = connect(None, host="127.0.0.1", log_to_driver=args.verbose)
    if not args.verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    runs = []
    try:
        cluster.start_serve(args.port)
        url = f"http://127.0.0.1:{args.port}"
        for i in range(args.repeats):
            status(f"cold start {i + 1}/{args.repeats} of {config.model_name} ({config.dtype})")
            runs.append(one_cold_start(args, config, url))
    finally:
        cluster.shutdown()
    console = stdout_console()
    print_runs(runs, f"{config.model_name} {config.dtype}", console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = args.label or f"{Path(str(config.model_name)).name} {config.dtype}"
    (out / "coldstart.json").write_text(json.dumps({"label": label, "runs": runs}, indent=1))
    plot([(label, runs)], out / "coldstart.png")
    console.print(f"wrote {out / 'coldstart.json'} and {out / 'coldstart.png'}")


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {p: statistics.median(r[p] for r in runs) for p in PHASES}


def print_runs(runs: list[dict[str, float]], title: str, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"cold start of {title}: seconds per phase")
    table.add_column("run")
    for p in (*PHASES, "total"):
        table.add_column(p, justify="right")
    rows = [(str(i + 1), r) for i, r in enumerate(runs)]
    if len(runs) > 1:
        rows.append(("median", median_phases(runs)))
    for name, r in rows:
        table.add_row(name, *(f"{r[p]:.2f}" for p in PHASES), f"{sum(r.values()):.2f}")
    console.print(table)


def plot(variants: list[tuple[str, list[dict[str, float]]]], path: Path) -> None:
    """One stacked bar per variant (the median of its runs), a segment per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(variants) + 3), 4.5))
    bottoms = [0.0] * len(variants)
    medians = [median_phases(runs) for _, runs in variants]
    for k, p in enumerate(PHASES):
        heights = [m[p] for m in medians]
        ax.bar(range(len(variants)), heights, bottom=bottoms, color=f"C{k}", label=p)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xticks(range(len(variants)), [name for name, _ in variants], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("seconds from the request to its first token")
    ax.set_title("where a replica's cold start goes (median of runs)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
