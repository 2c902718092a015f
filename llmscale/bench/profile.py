"""`llmscale profile`: where the time of real engine steps goes, on the roofline.

Three measurements, all through `LLMEngine.step`, so every number includes what serving pays
(scheduling, batch building, the model, sampling):

1. A workload: `--num-requests` prompts cut from the shipped corpus, all added at once, run to
   completion. Each step is timed and sorted into prefill, decode or mixed (both in one step).
2. Decode sweep: step latency for each batch size x context length. The requests enter the
   scheduler with their context already "in" the KV cache (allocated, left as zeros), so a
   32 x 2048 point costs a few decode steps, not a 64k-token prefill: attention and matmuls
   do the same work whatever the cached values are.
3. Prefill sweep: one prompt of each context length, prefilled from scratch.

FLOPs and bytes of every step come from `roofline.CostModel` applied to what the step really
scheduled; peaks come from a GEMM and streaming copies timed right here.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmscale.bench.roofline import Chunk, CostModel, Peaks, attainable, classify
from llmscale.config import DTYPE_CHOICES, DTYPE_HELP, ConfigError
from llmscale.engine_args import PARALLEL, EngineArgs

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"
PHASES = ("prefill", "decode", "mixed")


@dataclass
class StepRecord:
    seconds: float
    chunks: list[Chunk]

    @property
    def phase(self) -> str:
        kinds = {c.new > 1 for c in self.chunks}  # the runner's own split: one token = decode
        return "mixed" if len(kinds) == 2 else ("prefill" if True in kinds else "decode")

    @property
    def tokens(self) -> int:
        return sum(c.new for c in self.chunks)


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{name} must list positive integers, got {text!r}")
    return sorted(set(values))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("profile", help="where the time goes: prefill vs decode on the roofline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF folder or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default="results/profile", help="folder for profile.json and the PNGs")
    p.add_argument("--num-requests", type=int, default=16, help="workload: requests added at once")
    p.add_argument("--prompt-len", type=int, default=256, help="workload: prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="workload: generated tokens per request")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="decode sweep: batch sizes")
    p.add_argument("--context-lens", default="128,512,2048", help="decode and prefill sweep: context lengths")
    p.add_argument("--steps", type=int, default=4, help="decode sweep: timed steps per point (+1 warm-up)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="engine token budget per step")
    p.add_argument("--matmul-size", type=int, default=2048, help="peak FLOP/s: side of the square GEMM")
    p.add_argument("--seed", type=int, default=0)

    EngineArgs.add_cli_args(p, (PARALLEL,))
    p.add_argument("--calibrate", action="store_true",
                   help="instead: time a grid of step shapes and fit the planner's performance model; "
                        "--out is then the calibration file (default: results/profile/calib.json) and a "
                        "PNG of the fit goes beside it")
    p.add_argument("--repeats", type=int, default=5,
                   help="calibration: rounds over the step shapes, each timing every shape once (median)")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> None:
    from llmscale.console import stdout_console

    if args.calibrate:
        from llmscale.plan.calibrate import run_calibration

        if EngineArgs.from_cli_args(args).create_engine_config().parallel.world_size > 1:
            raise ConfigError("--calibrate fits the model of one engine process; it takes no parallelism "
                              "flags")

        run_calibration(args)
        return
    report = run_profile(args)
    out = Path(args.out)
    console = stdout_console()
    print_report(report, console)
    console.print(f"wrote {out / 'profile.json'}, {out / 'roofline.png'}, {out / 'step_latency.png'}")


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, write profile.json and the two PNGs under `args.out`, return the report."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmscale.bench.roofline import measure_peaks
    from llmscale.config import EngineConfig
    from llmscale.engine.llm_engine import LLMEngine
    from llmscale.engine.runner import kv_bytes_per_block
    from llmscale.model.loader import read_model_config
    from llmscale.model.lookup import resolve_model

    for name in ("num_requests", "prompt_len", "output_len", "steps", "matmul_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    batch_sizes = parse_ints(args.batch_sizes, "--batch-sizes")
    contexts = parse_ints(args.context_lens, "--context-lens")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model_cfg = read_model_config(resolve_model(args.model))
    # Decode-sweep requests hold context + 1 warm-up + `steps` tokens.
    max_len = max(args.prompt_len + args.output_len, max(contexts) + args.steps + 1)
    if max_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"the profile needs {max_len} positions but the model has "
                          f"{model_cfg.max_position_embeddings}; lower --context-lens or the workload")
    block_size = 16
    probe = EngineConfig.from_kwargs(dtype=args.dtype, device=args.device)
    per_block = kv_bytes_per_block(model_cfg, block_size, probe.activation_dtype)
    peak_tokens = max(args.num_requests * (args.prompt_len + args.output_len),
                      max(batch_sizes) * (max_len + block_size), max_len)
    # One spare block per request for partial blocks, plus slack for the warm-up request.
    blocks = -(-peak_tokens // block_size) + max(args.num_requests, max(batch_sizes)) + 8
    config = EngineConfig.from_kwargs(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=max_len,
        kv_cache_memory=blocks * per_block, block_size=block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=max(args.num_requests, max(batch_sizes)),
        **EngineArgs.from_cli_args(args).kwargs((PARALLEL,)))

    columns = (TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("peaks", total=1)
        engine = LLMEngine(config)
        try:
            # The GEMM peak in the dtype the model computes in (fp32 for bf16 weights on AVX2).
            peaks = measure_peaks(engine.model.activation_dtype, engine.device, matmul_size=args.matmul_size)
            progress.update(task, completed=1)
            threads = torch.get_num_threads()  # per rank with several
            cost = cost_model_of(engine)
            rng = random.Random(args.seed)
            prompts = PromptSource(corpus_tokens(engine.tokenizer), rng)

            warm_up(engine, prompts)
            task = progress.add_task("workload", total=args.num_requests * args.output_len)
            workload = run_workload(engine, prompts, args.num_requests, args.prompt_len, args.output_len,
                                    lambda n: progress.advance(task, n))
            task = progress.add_task("decode sweep", total=len(batch_sizes) * len(contexts))
            decode = []
            for ctx in contexts:
                for b in batch_sizes:
                    decode.append((b, ctx, decode_point(engine, prompts, b, ctx, args.steps)))
                    progress.advance(task)
            task = progress.add_task("prefill sweep", total=len(contexts))
            prefill = []
            for ctx in contexts:
                prefill.append((ctx, prefill_point(engine, prompts, ctx)))
                progress.advance(task)
        finally:
            engine.shutdown()  # its worker ranks, if any

    report: dict[str, Any] = {
        "model": engine.model_name,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
        "threads": threads,
        "settings": {k: getattr(args, k) for k in (
            "num_requests", "prompt_len", "output_len", "steps", "max_num_batched_tokens", "seed")}
        | {"batch_sizes": batch_sizes, "context_lens": contexts},
        "peaks": asdict(peaks) | {"memory_bytes": peaks.memory_bytes, "ridge": peaks.ridge},
        "cost_model": asdict(cost),
        "workload": summarize_workload(workload, cost, peaks),
        "decode_sweep": [summarize(steps, cost, peaks) | {"batch_size": b, "context_len": c}
                         for b, c, steps in decode],
        "prefill_sweep": [summarize(steps, cost, peaks) | {"context_len": c} for c, steps in prefill],
    }
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    write_plots(report, peaks, out)
    return report


def cost_model_of(engine: Any) -> CostModel:
    """The architecture's cost model with the weight bytes this engine really holds."""
    from llmscale.model.layers import RotaryEmbedding

    model = engine.model
    # A pipeline's rank 0 holds the embedding, not the lm_head: a matrix of the same shape.
    head = model.lm_head if model.lm_head is not None else model.embed_tokens
    skip = {id(model.lm_head), id(model.embed_tokens)}  # the embedding only gathers rows
    seen: set[int] = set()

    def tensor_bytes(module: Any, recurse: bool) -> int:
        total = 0
        for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    head_bytes = tensor_bytes(head, True)
    body = sum(tensor_bytes(m, False) for m in model.modules()
               if id(m) not in skip and not isinstance(m, RotaryEmbedding))
    # Rank 0 holds 1/T of each of its pipeline stage's layers; the roofline is the whole model's.
    tp = engine.config.parallel.tensor_parallel_size
    whole = tp * engine.model_config.num_hidden_layers / len(model.layers)
    return CostModel.from_config(engine.model_config, torch_elem_bytes(engine.dtype),
                                 torch_elem_bytes(engine.runner.kv_dtype),
                                 body_weight_bytes=round(body * whole), lm_head_bytes=head_bytes * tp)


def torch_elem_bytes(dtype: Any) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()


def corpus_tokens(tokenizer: Any) -> list[int]:
    """The shipped corpus's first 200k characters as token ids: prompts whose text does not matter."""
    return tokenizer.encode(CORPUS.read_text()[:200_000], add_special_tokens=False)


class PromptSource:
    """Token-id prompts cut at random offsets from the corpus, so no two share a prefix."""

    def __init__(self, corpus: list[int], rng: random.Random) -> None:
        self.corpus = corpus
        self.rng = rng

    def take(self, length: int) -> list[int]:
        if length <= len(self.corpus):
            start = self.rng.randrange(len(self.corpus) - length + 1)
            return self.corpus[start:start + length]
        # Longer than the corpus slice: wrap around (only the token count matters for timing).
        return [self.corpus[(i + self.rng.randrange(len(self.corpus))) % len(self.corpus)]
                for i in range(length)]


def sync(engine: Any) -> None:
    import torch

    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def timed_step(engine: Any) -> StepRecord:
    """One engine step, timed, with what it scheduled read off the requests' progress."""
    sched = engine.scheduler
    before = [(r, r.num_computed_tokens, r.num_tokens) for r in [*sched.running, *sched.waiting]]
    sync(engine)
    start = time.perf_counter()
    engine.step()
    sync(engine)
    seconds = time.perf_counter() - start
    chunks = [Chunk(done, r.num_computed_tokens - done, r.num_computed_tokens == total)
              for r, done, total in before if r.num_computed_tokens > done]
    return StepRecord(seconds, chunks)


def greedy(max_tokens: int) -> Any:
    from llmscale.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def warm_up(engine: Any, prompts: PromptSource) -> None:
    """First calls pay for allocator growth and kernel selection; keep them out of the numbers."""
    length = max(1, min(32, engine.max_model_len - 4))
    engine.add_request("warm-up", {"prompt_token_ids": prompts.take(length)}, greedy(2))
    while engine.has_unfinished_requests():
        engine.step()


def run_workload(engine: Any, prompts: PromptSource, num_requests: int, prompt_len: int,
                 output_len: int, advance: Any) -> list[StepRecord]:
    for i in range(num_requests):
        prompt = {"prompt_token_ids": prompts.take(prompt_len)}
        engine.add_request(f"workload-{i}", prompt, greedy(output_len))
    records = []
    while engine.has_unfinished_requests():
        rec = timed_step(engine)
        records.append(rec)
        advance(sum(1 for c in rec.chunks if c.samples))
    return records


def place_running(engine: Any, req: Any, context: int, what: str) -> None:
    """Put `req` straight into the running batch with its first `context` tokens counted as
    cached (their slots allocated, left as zeros): attention and matmuls do the same work
    whatever the cached values are, so a long context costs no prefill."""
    from llmscale.engine.request import RequestStatus

    if context and not engine.kv.allocate_slots(req, context):
        raise ConfigError(f"KV cache too small for {what}")
    req.num_computed_tokens = context
    req.status = RequestStatus.RUNNING
    engine.scheduler.running.append(req)


def decode_point(engine: Any, prompts: PromptSource, batch: int, context: int, steps: int
                 ) -> list[StepRecord]:
    """`steps` decode steps of `batch` requests at `context` tokens, after one warm-up step."""
    from llmscale.engine.request import Request

    for i in range(batch):
        # context - 1 tokens count as cached; the last prompt token is the first decode input.
        req = Request(f"decode-{batch}-{context}-{i}", prompts.take(context), greedy(steps + 1),
                      steps + 1, engine.eos_token_ids)
        place_running(engine, req, context - 1, f"the decode sweep point {batch} x {context}")
    timed_step(engine)
    records = [timed_step(engine) for _ in range(steps)]
    while engine.has_unfinished_requests():
        engine.step()
    return records


def prefill_point(engine: Any, prompts: PromptSource, context: int) -> list[StepRecord]:
    """The steps that prefill one `context`-token prompt (more than one if it exceeds the budget)."""
    engine.add_request(f"prefill-{context}", {"prompt_token_ids": prompts.take(context)}, greedy(1))
    records = []
    while engine.has_unfinished_requests():
        records.append(timed_step(engine))
    return records


def summarize(records: list[StepRecord], cost: CostModel, peaks: Peaks) -> dict[str, Any]:
    """Totals of a set of steps and where they sit on the roofline."""
    seconds = sum(r.seconds for r in records)
    chunks = [r.chunks for r in records]
    flops = sum(cost.flops(c) for c in chunks)
    nbytes = sum(cost.bytes(c) for c in chunks)
    intensity = flops / nbytes if nbytes else 0.0
    achieved = flops / seconds if seconds else 0.0
    return {
        "steps": len(records),
        "tokens": sum(r.tokens for r in records),
        "seconds": seconds,
        "step_ms_mean": 1e3 * seconds / len(records) if records else 0.0,
        "step_ms_median": 1e3 * statistics.median(r.seconds for r in records) if records else 0.0,
        "flops": flops,
        "bytes": nbytes,
        "flops_per_s": achieved,
        "bytes_per_s": nbytes / seconds if seconds else 0.0,
        "intensity": intensity,
        "bound": classify(intensity, peaks.ridge),
        "flops_fraction_of_peak": achieved / peaks.matmul_flops,
        "bytes_fraction_of_peak": (nbytes / seconds if seconds else 0.0) / peaks.memory_bytes,
        "fraction_of_roof": achieved / attainable(intensity, peaks) if intensity else 0.0,
    }


def summarize_workload(records: list[StepRecord], cost: CostModel, peaks: Peaks) -> dict[str, Any]:
    total = sum(r.seconds for r in records)
    phases = {}
    for phase in PHASES:
        steps = [r for r in records if r.phase == phase]
        if steps:
            phases[phase] = summarize(steps, cost, peaks) | {"time_share": sum(
                r.seconds for r in steps) / total}
    return {"seconds": total, "steps": len(records), "phases": phases,
            "step_ms": [1e3 * r.seconds for r in records], "step_phase": [r.phase for r in records]}


def write_plots(report: dict[str, Any], peaks: Peaks, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmscale.bench.roofline import plot_roofline

    points = [{"source": "workload", "phase": phase, "label": f"workload {phase}", "annotate": True,
               "intensity": s["intensity"], "flops": s["flops_per_s"]}
              for phase, s in report["workload"]["phases"].items()]
    points += [{"source": "sweep", "phase": "decode", "label": f"b{s['batch_size']} c{s['context_len']}",
                "annotate": True, "intensity": s["intensity"], "flops": s["flops_per_s"]}
               for s in report["decode_sweep"]]
    points += [{"source": "sweep", "phase": "prefill", "label": f"prefill {s['context_len']}",
                "annotate": True, "intensity": s["intensity"], "flops": s["flops_per_s"]}
               for s in report["prefill_sweep"]]
    title = (f"{report['model']} ({report['dtype']}, {report['device']}, {report['threads']} threads): "
             f"measured steps against measured peaks")
    plot_roofline(points, peaks, out / "roofline.png", title)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ctx in report["settings"]["context_lens"]:
        rows = [s for s in report["decode_sweep"] if s["context_len"] == ctx]
        left.plot([s["batch_size"] for s in rows], [s["step_ms_median"] for s in rows], marker="o",
                  label=f"context {ctx}")
    left.set_xscale("log", base=2)
    left.set_xlabel("batch size (requests decoding)")
    left.set_ylabel("decode step latency (ms, median)")
    left.set_title("decode step vs batch size and context", fontsize=10)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    rows = report["prefill_sweep"]
    right.plot([s["context_len"] for s in rows], [s["seconds"] * 1e3 for s in rows], marker="s",
               color="tab:red")
    right.set_xlabel("prompt length (tokens)")
    right.set_ylabel("prefill time (ms)")
    right.set_title("prefill of one prompt vs its length", fontsize=10)
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "step_latency.png", dpi=120)
    plt.close(fig)


def print_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    peaks = report["peaks"]
    console.print(
        f"[bold]{report['model']}[/] {report['dtype']} on {report['device']} ({report['threads']} threads). "
        f"Peaks: GEMM {peaks['matmul_flops'] / 1e9:.1f} GFLOP/s "
        f"({peaks['dtype']}, n={peaks['matmul_size']}), "
        f"copy {peaks['copy_bytes'] / 1e9:.1f} GB/s, read {peaks['read_bytes'] / 1e9:.1f} GB/s; "
        f"ridge {peaks['ridge']:.1f} FLOP/byte")

    def roofline_cells(s: dict[str, Any]) -> list[str]:
        return [f"{s['flops_per_s'] / 1e9:.1f}", f"{s['bytes_per_s'] / 1e9:.2f}", f"{s['intensity']:.1f}",
                f"{100 * s['flops_fraction_of_peak']:.0f}%", f"{100 * s['bytes_fraction_of_peak']:.0f}%",
                s["bound"]]

    roof_cols = ["GFLOP/s", "GB/s", "FLOP/B", "% peak FLOP/s", "% peak B/s", "bound"]
    w = report["workload"]
    settings = report["settings"]
    table = Table(title=f"workload: {settings['num_requests']} requests x {settings['prompt_len']} prompt + "
                        f"{settings['output_len']} output tokens, {w['seconds']:.2f} s in {w['steps']} steps")
    for col in ["phase", "steps", "tokens", "time (s)", "share", "ms/step", *roof_cols]:
        table.add_column(col, justify="left" if col in ("phase", "bound") else "right")
    for phase, s in w["phases"].items():
        table.add_row(phase, str(s["steps"]), str(s["tokens"]), f"{s['seconds']:.2f}",
                      f"{100 * s['time_share']:.0f}%", f"{s['step_ms_mean']:.1f}", *roofline_cells(s))
    console.print(table)

    table = Table(title="decode step latency (ms, median): batch size x context length")
    table.add_column("batch", justify="right")
    for ctx in settings["context_lens"]:
        table.add_column(f"ctx {ctx}", justify="right")
    for b in settings["batch_sizes"]:
        cells = []
        for ctx in settings["context_lens"]:
            s = next(x for x in report["decode_sweep"] if x["batch_size"] == b and x["context_len"] == ctx)
            cells.append(f"{s['step_ms_median']:.1f} ({s['bound'][0]}, {s['intensity']:.1f} F/B, "
                         f"{s['bytes_per_s'] / 1e9:.1f} GB/s)")
        table.add_row(str(b), *cells)
    table.caption = "(bound: c = compute, m = memory; F/B = FLOP per byte)"
    console.print(table)

    table = Table(title="prefill of one prompt")
    for col in ["tokens", "steps", "time (ms)", "tok/s", *roof_cols]:
        table.add_column(col, justify="left" if col == "bound" else "right")
    for s in report["prefill_sweep"]:
        table.add_row(str(s["context_len"]), str(s["steps"]), f"{s['seconds'] * 1e3:.1f}",
                      f"{s['tokens'] / s['seconds']:.0f}", *roofline_cells(s))
    console.print(table)
