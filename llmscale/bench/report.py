"""What a benchmark leaves behind: a rich table, a JSON file with every request's timings, and
PNG plots (latency percentiles and throughput against request rate, the CDF of TTFT, and for a
run that followed a rate schedule, the offered load, throughput and TTFT over time)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from llmscale.bench.arrivals import RateSchedule
from llmscale.bench.load import fmt_rate
from llmscale.bench.metrics import Run, percentile, summarize

TIME_WINDOWS = 20  # load_over_time.png: windows over a run, by send time


def _cell(stats: dict[str, float], keys: tuple[str, ...]) -> str:
    return "/".join("—" if math.isnan(stats[k]) else f"{stats[k]:.0f}" for k in keys)


def table(runs: list[Run], slo: dict[str, float], title: str) -> Table:
    t = Table(title=title)
    columns = ["run", "rate\nreq/s", "ok/\nfailed", "req/s", "output\ntok/s", "total\ntok/s",
               "TTFT ms\nmean/p50/p90/p99", "TPOT ms\nmean/p50/p90/p99", "ITL ms\np50/p99", "E2E ms\np50/p99"]
    if slo:
        columns += ["goodput\nreq/s", "SLO\nmet"]
    for c in columns:
        t.add_column(c, justify="left" if c == "run" else "right", no_wrap=c != "run")
    for run in runs:
        s = summarize(run, slo)
        name = run.label + (f" [yellow]({run.interrupted})[/yellow]" if run.interrupted else "")
        row = [name, fmt_rate(run.request_rate), f"{s['completed']}/{s['failed']}",
               f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
               f"{s['total_token_throughput']:.1f}", _cell(s["ttft_ms"], ("mean", "p50", "p90", "p99")),
               _cell(s["tpot_ms"], ("mean", "p50", "p90", "p99")), _cell(s["itl_ms"], ("p50", "p99")),
               _cell(s["e2e_ms"], ("p50", "p99"))]
        if slo:
            row += [f"{s['goodput']:.2f}", f"{s['slo_attainment']:.0%}"]
        t.add_row(*row)
    return t


def _clean(x: Any) -> Any:
    """Strict JSON: NaN (a statistic of nothing) becomes null, an infinite rate "inf"."""
    if isinstance(x, float):
        return None if math.isnan(x) else ("inf" if math.isinf(x) else x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def run_json(run: Run, slo: dict[str, float]) -> dict[str, Any]:
    doc = {"label": run.label, "request_rate": run.request_rate, "burstiness": run.burstiness,
           "max_concurrency": run.max_concurrency, "seed": run.seed, "interrupted": run.interrupted}
    if run.rate_schedule is not None:
        doc["rate_schedule"] = {"spec": run.rate_schedule.spec,
                                "segments": [list(s) for s in run.rate_schedule.segments]}
    return {**doc, "summary": summarize(run, slo), "requests": [r.to_json() for r in run.requests]}


def write_json(path: Path, config: dict[str, Any], runs: list[Run], slo: dict[str, float],
               extra: dict[str, Any] | None = None) -> None:
    doc = {"config": config, **(extra or {}), "runs": [run_json(r, slo) for r in runs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False))


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # an interrupted run may have nothing to draw
        ax.legend(fontsize=8)


def _save(fig: Any, path: Path, suptitle: str | None = None) -> Path:
    import matplotlib.pyplot as plt

    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(runs: list[Run], out_dir: Path, slo: dict[str, float], title: str) -> list[Path]:
    """Three PNGs, and load_over_time.png when a run followed a rate schedule; runs sharing a
    label form one line across their request rates."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rates = sorted({r.request_rate for r in runs})  # inf sorts last
    xs = {rate: i for i, rate in enumerate(rates)}
    labels = list(dict.fromkeys(r.label for r in runs))
    summaries = {id(r): summarize(r, slo) for r in runs}
    paths = []

    def series(label: str, value: Any) -> tuple[list[int], list[float]]:
        pts = sorted((xs[r.request_rate], value(summaries[id(r)])) for r in runs if r.label == label)
        return [p[0] for p in pts], [p[1] for p in pts]

    def rate_axis(ax: Any) -> None:
        ax.set_xticks(range(len(rates)), [fmt_rate(r) for r in rates])
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        for i, label in enumerate(labels):
            color = f"C{i}"
            for q, style in (("p50", "-o"), ("p99", "--s")):
                ax.plot(*series(label, lambda s, m=metric, q=q: s[m][q]), style, color=color,
                        label=f"{label} {q}")
        if f"{metric}" in slo:
            ax.axhline(slo[metric], color="red", lw=0.8, ls=":", label="SLO")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_yscale("log")
        rate_axis(ax)
        _legend(ax)
    paths.append(_save(fig, out_dir / "latency_vs_rate.png", f"{title}: latency vs request rate"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, label in enumerate(labels):
        axes[0].plot(*series(label, lambda s: s["output_throughput"]), "-o", color=f"C{i}", label=label)
        axes[1].plot(*series(label, lambda s: s["request_throughput"]), "-o", color=f"C{i}",
                     label=f"{label} completed")
        if slo:
            axes[1].plot(*series(label, lambda s: s["goodput"]), "--s", color=f"C{i}",
                         label=f"{label} goodput")
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("requests/s")
    for ax in axes:
        rate_axis(ax)
        _legend(ax)
    paths.append(_save(fig, out_dir / "throughput_vs_rate.png", f"{title}: throughput vs request rate"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ttft = sorted(r.ttft_s * 1e3 for r in run.requests if r.success and r.ttft_s is not None)
        if ttft:
            ax.step(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], where="post",
                    label=f"{run.label} @ {fmt_rate(run.request_rate)} req/s")
    if "ttft_ms" in slo:
        ax.axvline(slo["ttft_ms"], color="red", lw=0.8, ls=":", label="SLO")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    _legend(ax)
    ax.set_title(f"{title}: CDF of TTFT")
    paths.append(_save(fig, out_dir / "ttft_cdf.png"))
    scheduled = [(run, run.rate_schedule) for run in runs if run.rate_schedule is not None]
    if scheduled:
        paths.append(_plot_over_time(scheduled, out_dir / "load_over_time.png", slo, title))
    return paths


def _windows(run: Run, end_s: float) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per window of send time: its middle, completed requests/s, TTFT p50 and p99 (ms). Windows
    the run never reached (it stopped early) are left out rather than drawn as zero."""
    width = end_s / TIME_WINDOWS
    mids, tput, p50, p99 = [], [], [], []
    for k in range(TIME_WINDOWS):
        lo, hi = k * width, (k + 1) * width
        if lo >= run.duration_s:
            break
        ok = [r for r in run.requests
              if r.success and (lo <= r.start_s < hi or (k == TIME_WINDOWS - 1 and r.start_s >= hi))]
        ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
        mids.append(lo + width / 2)
        tput.append(len(ok) / width)
        p50.append(percentile(ttft, 50))
        p99.append(percentile(ttft, 99))
    return mids, tput, p50, p99


def _plot_over_time(scheduled: list[tuple[Run, RateSchedule]], path: Path, slo: dict[str, float],
                    title: str) -> Path:
    """Top: the offered rate (the schedule) and the completed requests/s by send time. Bottom:
    TTFT p50/p99 by send time: how latency follows the load."""
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    drawn: set[str] = set()
    for i, (run, sched) in enumerate(scheduled):
        color = f"C{i}"
        if sched.spec not in drawn:  # runs on one schedule share its line
            drawn.add(sched.spec)
            starts = [0.0]
            for d, _ in sched.segments:
                starts.append(starts[-1] + d)
            rates = [r for _, r in sched.segments]
            top.step(starts, rates + rates[-1:], where="post", color="black", lw=1.2,
                     ls=("-", "--", ":", "-.")[(len(drawn) - 1) % 4], label=f"offered ({sched.spec})")
        end = max([sched.duration_s, *(r.start_s for r in run.requests)])
        mids, tput, p50, p99 = _windows(run, end)
        top.plot(mids, tput, "-o", color=color, ms=3, label=f"{run.label} completed")
        bottom.plot(mids, p50, "-o", color=color, ms=3, label=f"{run.label} TTFT p50")
        bottom.plot(mids, p99, "--s", color=color, ms=3, label=f"{run.label} TTFT p99")
    if "ttft_ms" in slo:
        bottom.axhline(slo["ttft_ms"], color="red", lw=0.8, ls=":", label="SLO")
    top.set_ylabel("requests/s")
    bottom.set_ylabel("TTFT (ms)")
    bottom.set_yscale("log")
    bottom.set_xlabel(f"send time (s), {TIME_WINDOWS} windows")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(fig, path, f"{title}: load over time")
