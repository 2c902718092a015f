"""What `llmscale plan` shows: the recommendation and why, the frontier as a table, plan.json,
and a PNG of cost against latency."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from llmscale.bench.arrivals import RateSchedule
from llmscale.plan.deployment import ModelSpec
from llmscale.plan.planner import Evaluation, Plan


def autoscaled_replicas(best: Evaluation, schedule: RateSchedule) -> float:
    """Mean replicas over the schedule when each segment runs only what its rate needs."""
    total = sum(d for d, _ in schedule.segments)
    return sum(d * math.ceil(r / best.goodput) for d, r in schedule.segments) / total


def _row(e: Evaluation) -> list[str]:
    lat = e.at_target
    return [e.deployment.describe(), f"{e.deployment.devices}", f"${e.cost_per_hour:.2f}",
            f"${e.cost_per_million:.3f}", f"{e.goodput:.3g}", f"{lat.ttft_p99_ms:.0f}",
            f"{lat.tpot_p99_ms:.1f}", f"{lat.output_tokens_per_s:.0f}", e.binding]


def print_plan(plan: Plan, model: ModelSpec, schedule: RateSchedule | None, console: Any) -> None:
    columns = ["configuration", "devices", "$/hour", "$/1M out", "goodput/replica\nreq/s", "TTFT p99\nms",
               "TPOT p99\nms", "output\ntok/s", "binds"]
    table = Table(title=f"{model.name} at {plan.rate:g} req/s within {plan.slo}: the Pareto frontier "
                        f"(cost, p99 TTFT, goodput per replica)")
    for c in columns:
        table.add_column(c, justify="left" if c in ("configuration", "binds") else "right")
    for e in plan.frontier:
        table.add_row(*_row(e))
    console.print(table)
    best = plan.recommended
    console.print(f"[bold]recommended:[/] {best.deployment.describe()} "
                  f"({best.deployment.hardware.description}), ${best.cost_per_hour:.2f}/hour, "
                  f"${best.cost_per_million:.3f} per 1M output tokens")
    console.print(f"why: {plan.why()}")
    if schedule is not None:
        mean = autoscaled_replicas(best, schedule)
        per = best.cost_per_hour / best.deployment.replicas
        console.print(f"over the rate schedule ({schedule.spec}): planned for its peak; an autoscaler "
                      f"running what each segment needs averages {mean:.2f} replicas, ${mean * per:.2f}/hour "
                      f"against ${best.cost_per_hour:.2f} for the peak all day")
    if plan.budget_per_hour is not None:
        console.print(f"budget ${plan.budget_per_hour:.2f}/hour: {len(plan.evaluations)} configuration(s) "
                      f"within it")


def _evaluation_json(e: Evaluation) -> dict[str, Any]:
    d = e.deployment
    return {"configuration": d.describe(), "hardware": d.hardware.name, "weight_format": d.weight_format,
            "tensor_parallel_size": d.tp, "pipeline_parallel_size": d.pp, "replicas": d.replicas,
            "max_num_seqs": d.max_num_seqs, "max_num_batched_tokens": d.max_num_batched_tokens,
            "devices": d.devices, "cost_per_hour": e.cost_per_hour, "cost_per_million_output_tokens":
            e.cost_per_million, "goodput_per_replica": e.goodput, "saturation_per_replica": e.saturation,
            "binding": e.binding, "ttft_p99_ms": e.at_target.ttft_p99_ms,
            "tpot_p99_ms": e.at_target.tpot_p99_ms,
            "output_tokens_per_s": e.at_target.output_tokens_per_s}


def write_plan(plan: Plan, model: ModelSpec, schedule: RateSchedule | None, path: Path) -> None:
    doc = {"model": model.name, "slo": str(plan.slo), "rate": plan.rate,
           "budget_per_hour": plan.budget_per_hour,
           "rate_schedule": schedule.spec if schedule else None,
           "recommended": _evaluation_json(plan.recommended), "why": plan.why(),
           "frontier": [_evaluation_json(e) for e in plan.frontier],
           "evaluated": [_evaluation_json(e) for e in plan.evaluations],
           "rejected": [{"configuration": r.deployment.describe(), "reason": r.reason}
                        for r in plan.rejected]}
    if schedule is not None:
        doc["autoscaled_mean_replicas"] = autoscaled_replicas(plan.recommended, schedule)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False, default=lambda x: None))


def plot_frontier(plan: Plan, model: ModelSpec, path: Path) -> Path:
    """Cost per 1M output tokens against p99 TTFT; marker area follows goodput per replica."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    names = sorted({e.deployment.hardware.name for e in plan.evaluations})
    top = max(e.goodput for e in plan.evaluations)
    for i, name in enumerate(names):
        pts = [e for e in plan.evaluations if e.deployment.hardware.name == name]
        ax.scatter([e.at_target.ttft_p99_ms for e in pts], [e.cost_per_million for e in pts],
                   s=[30 + 270 * e.goodput / top for e in pts], color=f"C{i % 10}", alpha=0.6, label=name)
    front = sorted(plan.frontier, key=lambda e: e.at_target.ttft_p99_ms)
    ax.plot([e.at_target.ttft_p99_ms for e in front], [e.cost_per_million for e in front], "k--", lw=0.8,
            label="Pareto frontier")
    best = plan.recommended
    ax.scatter([best.at_target.ttft_p99_ms], [best.cost_per_million], marker="*", s=400, color="gold",
               edgecolor="black", zorder=5, label=f"recommended: {best.deployment.describe()}")
    if math.isfinite(plan.slo.ttft_p99_ms):
        ax.axvline(plan.slo.ttft_p99_ms, color="red", ls=":", lw=0.8, label="TTFT p99 target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"p99 TTFT at {plan.rate:g} req/s (ms)")
    ax.set_ylabel("USD per 1M output tokens")
    ax.set_title(f"{model.name}: {plan.slo} at {plan.rate:g} req/s (marker area: goodput per replica)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
