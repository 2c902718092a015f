"""`llmscale eval`: what a compressed model cost in quality and bought in size and speed.

Per model: parameters, bytes on disk, load time, peak RSS, perplexity on the held-out text
shipped in the package, teacher-forced top-1 agreement with a reference model's greedy
tokens, single-stream TPOT and batched throughput. Each model is measured in a fresh
process of its own (`eval_worker`), one after another, so load time and peak RSS are its
own and two models never compete for the CPU.

Agreement: the reference greedily continues fixed corpus prompts; every model is then fed
prompt + that continuation and scored on how often its argmax at each continuation position
is the reference's token. Teacher forcing keeps one early difference from derailing the
rest of the comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from llmscale.config import DTYPE_CHOICES, DTYPE_HELP, ConfigError

DEFAULT_NAME = "SmolLM2-135M-Instruct (default)"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="size, speed and quality of models side by side",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="HF folders or .gguf files (none: the built-in default model)")
    p.add_argument("--reference", default=None,
                   help="model whose greedy tokens define agreement (default: the first MODEL)")
    p.add_argument("--out", default="results/eval", help="folder for eval.json and eval.png")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--keep-quantized", action="store_true",
                   help="serve GGUF Q8_0/Q4_0/Q4_1 weights on the int8/int4 kernels, not dequantized")
    p.add_argument("--kv-cache-memory", default="512MiB", help="KV cache size per model")
    from llmscale.engine_args import PARALLEL, EngineArgs

    EngineArgs.add_cli_args(p, (PARALLEL,))
    p.add_argument("--window", type=int, default=256, help="perplexity: tokens per held-out window")
    p.add_argument("--max-windows", type=int, default=8, help="perplexity: windows scored at most")
    p.add_argument("--num-prompts", type=int, default=8, help="agreement: fixed prompts")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (agreement, TPOT, throughput)")
    p.add_argument("--greedy-tokens", type=int, default=32, help="agreement: reference tokens per prompt")
    p.add_argument("--tpot-tokens", type=int, default=64, help="single stream: generated tokens")
    p.add_argument("--tpot-repeats", type=int, default=3, help="single stream: runs (median taken)")
    p.add_argument("--batch-size", type=int, default=16, help="throughput: requests at once")
    p.add_argument("--batch-tokens", type=int, default=64, help="throughput: generated tokens per request")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    from llmscale.console import stdout_console

    console = stdout_console()
    report = run_eval(args)
    out = Path(args.out)
    print_table(report, console)
    console.print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")


def display_names(models: list[str | None]) -> list[str]:
    """Short names (folder or file names), falling back to full paths where two would clash."""
    short = [DEFAULT_NAME if m is None else (Path(m).name or m) for m in models]
    return [s if short.count(s) == 1 or m is None else str(m) for s, m in zip(short, models, strict=True)]


def worker_spec(args: argparse.Namespace, model: str | None, name: str) -> dict[str, Any]:
    from llmscale.engine_args import PARALLEL, EngineArgs

    longest = max(args.window + 1, args.prompt_len + args.greedy_tokens + 1,
                  args.prompt_len + max(args.tpot_tokens, args.batch_tokens))
    return {
        "model": model, "name": name, "dtype": args.dtype,
        "kv_cache_memory": args.kv_cache_memory, "max_model_len": longest,
        "engine_args": {**EngineArgs.from_cli_args(args).kwargs((PARALLEL,)),
                        **({"keep_quantized": True} if args.keep_quantized else {})},
        "window": args.window, "max_windows": args.max_windows, "num_prompts": args.num_prompts,
        "prompt_len": args.prompt_len, "greedy_tokens": args.greedy_tokens,
        "tpot_tokens": args.tpot_tokens, "tpot_repeats": args.tpot_repeats,
        "batch_size": args.batch_size, "batch_tokens": args.batch_tokens,
    }


def validate(args: argparse.Namespace) -> None:
    for name in ("window", "max_windows", "num_prompts", "prompt_len", "greedy_tokens", "tpot_repeats",
                 "batch_size", "batch_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.window < 2:
        raise ConfigError(f"--window must be >= 2, got {args.window}")
    if args.tpot_tokens < 2:
        raise ConfigError(f"--tpot-tokens must be >= 2 (TPOT spans tokens after the first), "
                          f"got {args.tpot_tokens}")
    for model in [*args.models, args.reference]:
        if model is not None and not Path(model).exists():
            raise ConfigError(f"model {model!r} not found")


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every model in turn; write eval.json and eval.png under `args.out`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmscale.compress.eval_worker import STAGES

    validate(args)
    models: list[str | None] = list(args.models) or [None]
    reference = args.reference if args.reference is not None else models[0]
    if reference not in models:
        models.insert(0, reference)  # measured too, so the table shows what agreement is against
    # The reference runs first: every other model needs its greedy tokens.
    order = [models.index(reference)] + [i for i in range(len(models)) if i != models.index(reference)]
    names = display_names(models)
    results: dict[int, dict[str, Any]] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress, tempfile.TemporaryDirectory() as tmp:
        overall = progress.add_task("models", total=len(models))
        ref_tokens: dict[str, Any] | None = None
        for i in order:
            spec = worker_spec(args, models[i], names[i])
            spec["is_reference"] = ref_tokens is None
            spec["reference"] = ref_tokens
            task = progress.add_task(f"{names[i]}: starting", total=len(STAGES))

            def on_stage(stage: str, task: Any = task, name: str = names[i]) -> None:
                progress.update(task, advance=1, description=f"{name}: {stage} done")

            results[i] = run_worker(spec, Path(tmp) / f"{len(results)}", on_stage)
            if ref_tokens is None:
                ref_tokens = {"prompts": results[i]["prompts"], "greedy": results[i]["greedy"]}
            progress.update(overall, advance=1)
    ordered = [results[i] for i in range(len(models))]
    ref_result = results[order[0]]
    for r in ordered:
        r["is_reference"] = r is ref_result
        r.pop("prompts")
        r.pop("greedy")
    report = {
        "reference": ref_result["name"],
        "reference_tokens": ref_tokens,
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "models", "out")},
        "models": ordered,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "eval.png")
    return report


def run_worker(spec: dict[str, Any], stem: Path, on_stage: Any) -> dict[str, Any]:
    """Run one model's worker process; stage lines on its stdout drive the progress bar."""
    spec_path, result_path, err_path = stem.with_suffix(".spec.json"), stem.with_suffix(".json"), \
        stem.with_suffix(".err")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmscale.compress.eval_worker", str(spec_path),
                                 str(result_path)], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                on_stage(json.loads(line)["stage"])
        code = proc.wait()
    if code != 0:
        lines = [ln for ln in err_path.read_text().splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {code}"
        raise ConfigError(f"evaluating {spec['name']} failed: {detail}")
    return json.loads(result_path.read_text())


def _fmt_delta(value: float, base: float) -> str:
    return f" ({100 * (value / base - 1):+.1f}%)" if base and value != base else ""


def print_table(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    ref = next(r for r in report["models"] if r["is_reference"])
    s = report["settings"]
    table = Table(title=f"llmscale eval (reference: {report['reference']})")
    for col in ["model", "dtype", "params (M)", "disk (MB)", "load (s)", "peak RSS (MB)", "perplexity",
                "top-1 agree", "TPOT (ms)", "batched tok/s"]:
        table.add_column(col, justify="left" if col in ("model", "dtype") else "right")
    for r in report["models"]:
        agree = "n/a" if r.get("agreement") is None else f"{100 * r['agreement']:.1f}%"
        speedup = ref["tpot_s"] / r["tpot_s"]
        table.add_row(
            r["name"] + (" *" if r["is_reference"] else ""), r["dtype"], f"{r['parameters'] / 1e6:.1f}",
            f"{r['disk_bytes'] / 1e6:.1f}", f"{r['load_s']:.2f}", f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{r['perplexity']:.3f}{_fmt_delta(r['perplexity'], ref['perplexity'])}", agree,
            f"{1e3 * r['tpot_s']:.1f}" + ("" if r["is_reference"] else f" ({speedup:.2f}x)"),
            f"{r['throughput_tok_s']:.0f}")
    table.caption = (f"* reference. Perplexity over {ref['perplexity_tokens']} held-out tokens "
                     f"({s['window']}-token windows); agreement over {ref['agreement_tokens']} "
                     f"teacher-forced positions; TPOT: {s['tpot_tokens']} tokens, one request; throughput: "
                     f"{s['batch_size']} requests x {s['batch_tokens']} tokens")
    console.print(table)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    names = [r["name"] for r in rows]
    panels = [
        ("disk (MB)", [r["disk_bytes"] / 1e6 for r in rows]),
        ("peak RSS (MB)", [r["peak_rss_bytes"] / 2**20 for r in rows]),
        ("perplexity (lower is better)", [r["perplexity"] for r in rows]),
        ("top-1 agreement with reference", [r.get("agreement") or math.nan for r in rows]),
        ("single-stream TPOT (ms)", [1e3 * r["tpot_s"] for r in rows]),
        ("batched throughput (tok/s)", [r["throughput_tok_s"] for r in rows]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    colors = [f"C{i}" for i in range(len(rows))]
    for ax, (title, values) in zip(axes.flat, panels, strict=True):
        ax.bar(range(len(rows)), values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"llmscale eval: reference {report['reference']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
