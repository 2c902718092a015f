"""The planner's predictions against measured runs: calibrate, then for each workload run
`llmscale serve` + `llmscale bench serve` and `llmscale simulate` with identical flags.

    python benchmarks/plan_validate.py [--workloads fixed,lognormal,prefix] [--num-prompts 48]
                                       [--repeats 1] [--calibration FILE] [--quick]
                                       [--out results/plan-validate]

1. `llmscale profile --calibrate` (skipped with --calibration FILE) fits this machine.
2. Per workload, `llmscale simulate --request-rate inf` predicts where one server saturates;
   the rates run are 25%, 50% and 75% of that prediction, then inf (everything at once).
3. Per repeat: `llmscale profile --calibrate` again, just before the sweep (this shared host's
   speed drifts by 15% within minutes, more than the targets allow, so every prediction comes
   from the machine as it was when its sweep ran; with --calibration FILE that file serves
   throughout). Then the real server is started on 127.0.0.1 (the default engine,
   `--kv-cache-memory 1GiB` in both), `llmscale bench serve --sweep-rates R1,R2,R3,inf` is
   sent to it, it is stopped, and `llmscale simulate` runs the same flags from the repeat's
   calibration: the same prompts, lengths, seeds and arrival times. During the sweep the server
   logs every step (`--log-steps`), and the sum of those steps is set against what the model
   says steps of the same shapes take: the model's own error, apart from the simulator's
   scheduling. Each repeat runs on a fresh server (a second sweep of the same prompts would
   hit the prefix cache); a cell's error is the median of the repeats' own errors.
4. Printed: predicted against measured output throughput, TTFT p50/p99 and TPOT p50/p99 per
   run, with the relative error; the saturation rate (the inf run's completed requests per
   second) side by side. Written to --out: each side's results.json, summary.json and
   validation.png (predicted against measured, one panel per metric).

Workloads (all with `--ignore-eos`, so lengths are exactly the drawn ones):
  fixed       256 prompt tokens, 64 output tokens
  lognormal   prompts lognormal(mean 200, sigma 0.8), outputs lognormal(mean 64, sigma 0.6)
  prefix      4 shared system prompts of 256 tokens + 64 own tokens, 48 output tokens
`--quick` runs 12 requests per rate of the fixed workload only, to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from llmscale.console import stdout_console
from llmscale.serve.process import free_port, start_server, stop_server, wait_ready

WORKLOADS = {
    "fixed": ["--prompt-len", "fixed:256", "--output-len", "fixed:64"],
    "lognormal": ["--prompt-len", "lognormal:200,0.8", "--output-len", "lognormal:64,0.6"],
    "prefix": ["--dataset", "prefix-share", "--num-prefixes", "4", "--prefix-len", "256",
               "--prompt-len", "fixed:64", "--output-len", "fixed:48"],
}
ENGINE = ["--kv-cache-memory", "1GiB"]
FRACTIONS = (0.25, 0.5, 0.75)
METRICS = (("output_throughput", None, "output tok/s"), ("ttft_ms", "p50", "TTFT p50"),
           ("ttft_ms", "p99", "TTFT p99"), ("tpot_ms", "p50", "TPOT p50"), ("tpot_ms", "p99", "TPOT p99"))
console = stdout_console()


def llmscale(*args: str, log: Path | None = None) -> None:
    cmd = [sys.executable, "-c", "from llmscale.cli import main; main()", *args]
    with open(log, "w") if log else open("/dev/null", "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"failed ({code}): llmscale {' '.join(args)}" + (f"; see {log}" if log else ""))


def runs_of(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["runs"]


def value(run: dict[str, Any], metric: str, stat: str | None) -> float:
    s = run["summary"][metric]
    v = s if stat is None else s[stat]
    return math.nan if v is None else float(v)


def validate(name: str, args: argparse.Namespace, calib: Path, out: Path) -> dict[str, Any]:
    flags = [*WORKLOADS[name], "--num-prompts", str(args.num_prompts), "--seed", "0"]
    (out / name).mkdir(parents=True, exist_ok=True)
    probe = out / name / "saturation-probe"
    llmscale("simulate", "--calibration", str(calib), *ENGINE, *flags, "--request-rate", "inf",
             "--out", str(probe), log=out / name / "probe.log")
    saturation = runs_of(probe / "results.json")[0]["summary"]["request_throughput"]
    rates = ",".join(f"{saturation * f:.3g}" for f in FRACTIONS) + ",inf"
    sweep = [*flags, "--sweep-rates", rates]
    pairs, drifts, step_ratios = [], [], []
    for r in range(args.repeats):
        # The calibration this sweep is predicted from: taken just before it, unless one was given.
        own = calib
        if args.recalibrate:
            own = out / name / f"calib-{r + 1}.json"
            llmscale("profile", "--calibrate", "--out", str(own), log=out / name / f"calibrate-{r + 1}.log")
        drifts.append(drift(own, calib))
        # A fresh server each time: a second sweep of the same prompts would hit the prefix cache.
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        steps = out / name / f"steps-{r + 1}.jsonl"
        steps.unlink(missing_ok=True)
        server = start_server(port, [*ENGINE, "--log-steps", str(steps)], out / name / f"server-{r + 1}.log")
        try:
            wait_ready(url, server)
            llmscale("bench", "serve", "--base-url", url, *sweep,
                     "--out", str(out / name / f"measured-{r + 1}"), log=out / name / f"bench-{r + 1}.log")
        finally:
            stop_server(server)
        llmscale("simulate", "--calibration", str(own), *ENGINE, *sweep,
                 "--out", str(out / name / f"predicted-{r + 1}"), log=out / name / f"simulate-{r + 1}.log")
        pairs.append((runs_of(out / name / f"predicted-{r + 1}" / "results.json"),
                      runs_of(out / name / f"measured-{r + 1}" / "results.json")))
        step_ratios.append(served_step_ratio(steps, own))
    rows = []
    for i in range(len(pairs[0][0])):
        cells = {}
        for metric, stat, label in METRICS:
            predicted = [value(p[i], metric, stat) for p, _ in pairs]
            measured = [value(m[i], metric, stat) for _, m in pairs]
            errors = [pv / mv - 1 if mv else math.nan for pv, mv in zip(predicted, measured, strict=True)]
            cells[label] = {"predicted": statistics.median(predicted),
                            "measured": statistics.median(measured),
                            "measured_min": min(measured), "measured_max": max(measured),
                            "error": statistics.median(errors), "error_min": min(errors),
                            "error_max": max(errors)}
        rows.append({"rate": pairs[0][0][i]["request_rate"], "metrics": cells,
                     "requests_per_s": {side: statistics.median(runs[j][i]["summary"]["request_throughput"]
                                                                for runs in pairs)
                                        for j, side in enumerate(("predicted", "measured"))}})
    return {"workload": name, "flags": sweep, "predicted_saturation": saturation, "runs": rows,
            "drift": drifts, "served_step_ratio": step_ratios}


def drift(calib: Path, first: Path) -> float:
    """How much slower a calibration's steps ran than the first calibration's, on the same shapes
    (median ratio): how far the shared host's speed moved between them."""
    from llmscale.plan.calibrate import Calibration

    a, b = Calibration.read(calib), Calibration.read(first)
    return statistics.median(x["seconds"] / y["seconds"] for x, y in zip(a.samples, b.samples, strict=True))


def served_step_ratio(steps: Path, calib: Path) -> float:
    """How long a sweep's server steps took (its `--log-steps` file) against what the calibrated
    model says steps of those very shapes take as served, each with what is left of the server's
    handoff of the step before's outputs: the model's own error, apart from the simulator's
    scheduling, the arrivals and the host drifting before the sweep."""
    from llmscale.plan.calibrate import Calibration
    from llmscale.plan.serving import LoggedStep, handed_over

    calibration = Calibration.read(calib)
    model = calibration.served(calibration.curve())  # a fresh server's: this sweep's was one
    handoff = calibration.serving_overhead().handoff()
    logged = [LoggedStep.parse(line) for line in steps.read_text().splitlines()]
    measured = sum(step.seconds for step in logged)
    predicted = sum(model.step_seconds(step.chunks) for step in logged)
    for before, step in zip(logged, logged[1:], strict=False):
        predicted += max(0.0, handoff.seconds(*handed_over(before, step)) - step.idle_before(before))
    return measured / predicted


def print_table(results: list[dict[str, Any]]) -> None:
    table = Table(title="predicted (llmscale simulate) vs measured (llmscale serve + bench serve): "
                        "predicted / measured (medians of the repeats), relative error (median of the "
                        "repeats' own) [range of the repeats' errors]")
    for col in ("workload", "rate req/s", *(label for _, _, label in METRICS)):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in results:
        for run in r["runs"]:
            cells = []
            for _, _, label in METRICS:
                c = run["metrics"][label]
                spread = (f" [{c['error_min']:+.0%}..{c['error_max']:+.0%}]"
                          if c["error_max"] > c["error_min"] else "")
                cells.append(f"{c['predicted']:.0f} / {c['measured']:.0f} ({c['error']:+.0%}){spread}")
            rate = run["rate"]
            shown = "inf" if rate in ("inf", math.inf) else f"{float(rate):.3g}"
            table.add_row(r["workload"], shown, *cells)
    console.print(table)
    for r in results:
        sat = r["runs"][-1]["requests_per_s"]
        drifts = ", ".join(f"{s:.2f}" for s in r["drift"])
        ratios = ", ".join(f"{s:.2f}" for s in r["served_step_ratio"])
        console.print(f"{r['workload']}: saturation {sat['predicted']:.2f} req/s predicted, "
                      f"{sat['measured']:.2f} measured ({sat['predicted'] / sat['measured'] - 1:+.1%}); "
                      f"each sweep's calibration ran {drifts}x the first's step times; "
                      f"the server's steps took {ratios}x the model's time for their shapes")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4))
    for ax, (_, _, label) in zip(axes, METRICS, strict=True):
        for i, r in enumerate(results):
            cells = [run["metrics"][label] for run in r["runs"]]
            pts = [(c["measured"], c["predicted"]) for c in cells]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", label=r["workload"])
        values = [v for r in results for run in r["runs"] for v in (run["metrics"][label]["measured"],
                                                                    run["metrics"][label]["predicted"])
                  if math.isfinite(v) and v > 0]
        lo, hi = min(values) / 1.3, max(values) * 1.3
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="gray", alpha=0.2,
                        label="within 10%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # labelled minor ticks overlap within one decade
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("measured")
        ax.set_ylabel("predicted")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("llmscale simulate against llmscale serve + bench serve, same workloads and arrivals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--repeats", type=int, default=1,
                   help="measured sweeps per workload, each on a fresh server")
    p.add_argument("--calibration", type=Path, default=None,
                   help="use this calibration for the rates and every prediction (no recalibrating)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("results/plan-validate"))
    args = p.parse_args()
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.quick:
        names, args.num_prompts = ["fixed"], 12
    args.out.mkdir(parents=True, exist_ok=True)
    args.recalibrate = args.calibration is None
    calib = args.calibration
    if calib is None:
        calib = args.out / "calib.json"
        console.print("calibrating (llmscale profile --calibrate)")
        llmscale("profile", "--calibrate", "--out", str(calib), log=args.out / "calibrate.log")
    results = []
    for name in names:
        console.print(f"workload {name}: simulate, serve + bench serve, simulate")
        results.append(validate(name, args, calib, args.out))
    print_table(results)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out / "validation.png")
    console.print(f"wrote {args.out / 'summary.json'} and {args.out / 'validation.png'}")


if __name__ == "__main__":
    main()
