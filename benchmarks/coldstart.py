"""Cold starts of one replica by weight format and cache state: `llmscale cluster coldstart` per
variant, one table and one stacked-bar PNG.

    python benchmarks/coldstart.py [--repeats 3] [--variants fp32,bf16,int8,int4,gguf-q4,...]
                                   [--out results/coldstart]

  fp32, bf16        the default model (its GGUF converted once and cached) in that dtype
  int8, int4        checkpoints from `llmscale quantize` (made first, into --out; not timed)
  gguf-q4           the default GGUF served with --keep-quantized (Q4_1 weights, int4 kernels)
  fp32-fresh-cache  fp32 with an empty LLMSCALE_CACHE, as on a machine that never ran llmscale
                    (one run): the replica builds the C kernels; the GGUF's conversion is paid
                    too, but by the ingress when the application deploys, before the request
  NAME-streamed     NAME with --stream-weights: the replica is ready once the embeddings are in,
                    and the layers load in order while the first request runs through them
  NAME-cold-disk    NAME with --evict-page-cache: the checkpoint is read from the disk, not the
                    page cache, as on a machine that just booted

Each variant is a separate `llmscale cluster coldstart` (its own Ray cluster, whose start is not
counted); the medians of its runs are printed side by side and drawn as coldstart.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.table import Table

from llmscale.cluster.coldstart import PHASES, median_phases, plot
from llmscale.console import stdout_console
from llmscale.serve.process import free_port

ENGINE = ["--kv-cache-memory", "256MiB", "--max-model-len", "1024"]
VARIANTS = ("fp32", "bf16", "int8", "int4", "gguf-q4", "fp32-fresh-cache", "fp32-streamed", "int8-streamed",
            "fp32-cold-disk", "fp32-cold-disk-streamed")
console = stdout_console()


def llmscale(*args: str, env: dict[str, str] | None = None, log: Path) -> None:
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "llmscale.cli", *args], stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode
    if code:
        raise SystemExit(f"failed ({code}): llmscale {' '.join(args)}; see {log}")


def variant_args(name: str, out: Path) -> tuple[list[str], dict[str, str], int | None]:
    """(flags, environment, runs or None for --repeats) of a variant; quantizes what it needs."""
    for suffix, flag in (("-streamed", "--stream-weights"), ("-cold-disk", "--evict-page-cache")):
        if name.endswith(suffix):
            flags, env, runs = variant_args(name.removesuffix(suffix), out)
            return [*flags, flag], env, runs
    if name in ("int8", "int4"):
        ckpt = out / f"ckpt-{name}"
        if not (ckpt / "config.json").exists():
            llmscale("quantize", "--method", name, "--out", str(ckpt), log=out / f"quantize-{name}.log")
        return ["--model", str(ckpt), "--dtype", "float32"], {}, None
    if name == "gguf-q4":
        return ["--keep-quantized", "--dtype", "float32"], {}, None
    if name == "fp32-fresh-cache":
        return ["--dtype", "float32"], {"LLMSCALE_CACHE": tempfile.mkdtemp(prefix="llmscale-cold-")}, 1
    return ["--dtype", {"fp32": "float32", "bf16": "bfloat16"}[name]], {}, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("results/coldstart"))
    args = p.parse_args()
    names = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in names if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        flags, env, runs = variant_args(name, args.out)
        console.print(f"{name}: llmscale cluster coldstart {' '.join(flags)}")
        llmscale("cluster", "coldstart", *flags, *ENGINE,
                 "--repeats", str(runs or args.repeats), "--port", str(free_port()), "--label", name,
                 "--out", str(args.out / name), env=env, log=args.out / f"{name}.log")
        results.append((name, json.loads((args.out / name / "coldstart.json").read_text())["runs"]))
    table = Table(title="cold start of one replica, median seconds per phase (runs)")
    for col in ("variant", *PHASES, "total"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, runs in results:
        m = median_phases(runs)
        table.add_row(f"{name} ({len(runs)})", *(f"{m[ph]:.2f}" for ph in PHASES), f"{sum(m.values()):.2f}")
    console.print(table)
    (args.out / "summary.json").write_text(json.dumps(dict(results), indent=1))
    plot(results, args.out / "coldstart.png")
    console.print(f"wrote {args.out / 'summary.json'} and {args.out / 'coldstart.png'}")


if __name__ == "__main__":
    main()
