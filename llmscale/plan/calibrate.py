"""Fit the performance model to real steps of this engine on this machine.

`measure` runs a grid of step shapes through `LLMEngine.step` (decode batches over context
lengths, prefill chunks, and the mixed steps chunked prefill makes), each with its requests
placed straight into the scheduler with their context already allocated, as `llmscale
profile` does, so a 64 x 1024 decode point costs a few steps, not a 64k-token prefill. Every
step pays what a server pays: scheduling, batch building, the model, sampling, detokenizing.

`fit_curve` fits the measured-curve model of this very model and dtype; `fit` the roofline
coefficients that carry over to other models (see `step_model`). Both minimise the squared
relative error with non-negative least squares.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmscale.bench.profile import PromptSource, corpus_tokens, cost_model_of, place_running
from llmscale.bench.roofline import Chunk
from llmscale.config import ConfigError
from llmscale.engine.block_pool import BlockPool, KVBlock
from llmscale.plan.serving import FirstRun, Served, ServingOverhead
from llmscale.plan.step_model import (
    Coefficients,
    CurveModel,
    Features,
    Geometry,
    StepModel,
    StepTimeModel,
    curve_terms,
    linear_seconds,
    linear_terms,
)

CALIBRATION_VERSION = 4


@dataclass(frozen=True)
class Sample:
    chunks: tuple[Chunk, ...]
    seconds: float  # median of the repeats


# Token counts a step's linears are measured at: dense around the row counts where the
# engine's kernels change path (16, 24, 32, 64, 96, 128 rows), sparser beyond.
TOKEN_GRID = (1, 2, 4, 8, 12, 16, 17, 24, 25, 32, 33, 48, 64, 65, 96, 97, 128, 129, 192, 256, 384, 512,
              768, 1024, 1536, 2048)
DECODE_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# Decode contexts, each with its largest batch: up to the 2048-token prompts a long-tailed
# workload brings, with the longest batch bounded so its K/V fits the shorter ones' memory.
DECODE_CONTEXTS = ((32, 128), (256, 128), (1024, 128), (2048, 64))
MAX_LEN = 4096  # the calibration engine's context: room for the 2048-token decodes and 1536 + 512 prefills


def default_shapes(max_len: int, max_tokens: int, max_seqs: int) -> list[tuple[Chunk, ...]]:
    """Prefill chunks over the token grid, decode batches over contexts (equal, one long among
    short ones, and long-tailed), prefill chunks after a cached prefix, and decodes beside a
    prefill chunk (chunked prefill's mixed steps)."""
    def fits(context: int, new: int) -> bool:
        return context + new + 8 <= max_len

    shapes: list[tuple[Chunk, ...]] = []
    for n in TOKEN_GRID:
        if 1 < n <= max_tokens and fits(0, n):
            shapes.append((Chunk(0, n, True),))
    for ctx, largest in DECODE_CONTEXTS:
        for b in DECODE_BATCHES:
            if b <= min(largest, max_seqs, max_tokens) and fits(ctx, 1):
                shapes.append(tuple(Chunk(ctx, 1, True) for _ in range(b)))
    for ctx in (1024, 2048):  # one long context among short ones: summed vs padded attention
        for b in (4, 16, 32, 64):
            if b <= min(max_seqs, max_tokens) and fits(ctx, 1):
                shapes.append((Chunk(ctx, 1, True),) + tuple(Chunk(32, 1, True) for _ in range(b - 1)))
    rng = random.Random(0)  # decodes over a served workload's spread of contexts: long-tailed
    for b in (8, 16, 32, 48, 64):
        if b <= min(max_seqs, max_tokens):
            contexts = [min(max_len - 9, 16 + round(rng.lognormvariate(5.3, 0.8))) for _ in range(b)]
            shapes.append(tuple(Chunk(ctx, 1, True) for ctx in contexts))
    for ctx in (512, 1536):
        for n in (16, 64, 256, 512):
            if n <= max_tokens and fits(ctx, n):
                shapes.append((Chunk(ctx, n, True),))
    for b in (1, 8, 32):
        for n in (16, 64, 256, 512 - b):
            if b + 1 <= max_seqs and b + n <= max_tokens and fits(256, 1) and fits(0, n):
                shapes.append(tuple(Chunk(256, 1, True) for _ in range(b)) + (Chunk(0, n, True),))
    return shapes


def blocks_for(shapes: Sequence[tuple[Chunk, ...]], block_size: int) -> int:
    """KV blocks the largest shape holds at once, one spare per request for its sampled token."""
    return max(sum(-(-(c.context + c.new) // block_size) + 1 for c in shape) for shape in shapes)


def geometry_of_engine(engine: Any) -> Geometry:
    """The engine's model, with the weight bytes it really holds (quantized formats included)."""
    cost = cost_model_of(engine)
    dense = Geometry.of(engine.model_config, "fp32", cost.kv_elem_bytes)
    return replace(dense, body_bytes=cost.body_weight_bytes, head_bytes=cost.lm_head_bytes)


def run_shape(engine: Any, shape: Sequence[Chunk], prompts: PromptSource, tag: str) -> float:
    """Place the shape's requests in the running batch (`profile.place_running`), time one
    step, drop them."""
    from llmscale.engine.request import Request, RequestStatus
    from llmscale.engine.sampling_params import SamplingParams
    from llmscale.model.tokenizer import IncrementalDetokenizer

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    placed = []
    for i, c in enumerate(shape):
        ids = prompts.take(c.context + c.new)
        req = Request(f"calib-{tag}-{i}", ids, params, 4, engine.eos_token_ids)
        place_running(engine, req, c.context, "the calibration shapes")
        engine.detokenizers[req.request_id] = IncrementalDetokenizer(engine.tokenizer, ids)
        placed.append(req)
    start_s = time.perf_counter()
    engine.step()
    seconds = time.perf_counter() - start_s
    for req in placed:
        if not req.is_finished:
            engine.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        engine.detokenizers.pop(req.request_id, None)
    return seconds


def measure(engine: Any, shapes: Sequence[tuple[Chunk, ...]], repeats: int,
            advance: Callable[[], None] = lambda: None) -> list[Sample]:
    """Each shape's median over `repeats` rounds, a round timing every shape once. A shared
    host's memory bandwidth drifts within a minute by more than the targets allow (BENCHMARKS.md,
    planner); timed in rounds, every shape sees the same moments, so the drift moves the whole
    curve alike instead of giving each shape the speed of its own moment."""
    prompts = PromptSource(corpus_tokens(engine.tokenizer), random.Random(0))
    run_shape(engine, shapes[0], prompts, "warm-up")  # allocator growth, first-call setup
    times: list[list[float]] = [[] for _ in shapes]
    for r in range(repeats):
        for k, shape in enumerate(shapes):
            times[k].append(run_shape(engine, shape, prompts, f"{k}-{r}"))
            advance()
    return [Sample(tuple(shape), statistics.median(t)) for shape, t in zip(shapes, times, strict=True)]


FIRST_RUN_COUNTS = 12  # prefill chunks at token counts the engine has not run, each timed twice


def measure_first_run(engine: Any, shapes: Sequence[tuple[Chunk, ...]], max_tokens: int) -> FirstRun:
    """What running a token count for the first time adds: prefill chunks at counts no shape
    used, each timed on its first run and again (the least of two), the difference fitted as
    a fixed cost plus a cost per token (non-negative least squares)."""
    used = {sum(c.new for c in shape) for shape in shapes}
    top = min(max_tokens, 512)  # the served steps' range (512-token steps by default)
    counts = [n for n in range(20, top, max(1, (top - 20) // (3 * FIRST_RUN_COUNTS))) if n not in used]
    counts = counts[::max(1, len(counts) // FIRST_RUN_COUNTS)][:FIRST_RUN_COUNTS]
    prompts = PromptSource(corpus_tokens(engine.tokenizer), random.Random(2))
    rows, extra = [], []
    for n in counts:
        shape = (Chunk(0, n, True),)
        first = run_shape(engine, shape, prompts, f"first-{n}")
        again = min(run_shape(engine, shape, prompts, f"again-{n}-{r}") for r in range(2))
        rows.append([1.0, float(n)])
        extra.append(first - again)
    if not rows:
        return FirstRun()
    step_s, per_token_s = (float(x) for x in nnls(np.array(rows), np.array(extra)))
    return FirstRun(step_s, per_token_s)


# ----- the fit -----------------------------------------------------------------------------

def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 (Lawson-Hanson active set), for a handful of columns."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(3 * n):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max(initial=-np.inf) <= 1e-12 * max(1.0, np.abs(w).max()):
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x


@dataclass(frozen=True)
class Fit:
    coefficients: Coefficients
    relative_errors: list[float]  # (predicted - measured) / measured, per sample

    @property
    def mean_abs_error(self) -> float:
        return float(np.mean(np.abs(self.relative_errors)))

    @property
    def max_abs_error(self) -> float:
        return float(np.max(np.abs(self.relative_errors)))


def _fit_at(features: list[Features], seconds: np.ndarray, g: Geometry, bw: float, flops: float
            ) -> tuple[float, np.ndarray]:
    roof = np.array([linear_seconds(f, g, bw, flops) for f in features])
    a = np.array([linear_terms(f, g) for f in features]) / seconds[:, None]
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    x = nnls(a / scale, 1.0 - roof / seconds) / scale
    residual = (roof + np.array([linear_terms(f, g) for f in features]) @ x) / seconds - 1.0
    return float(residual @ residual), x


def fit(samples: Sequence[Sample], geometry: Geometry, peak_bandwidth: float, peak_flops: float) -> Fit:
    """Roofline coefficients for these samples. Weights stream at the measured DRAM bandwidth:
    with one model the weights' time cannot be told apart from the fixed cost of a step (both
    are paid once per step), and DRAM is what a model too big for the caches streams from,
    which is what this fit is for. The linears' FLOP/s comes from a log grid over 0.1% to 400%
    of the measured GEMM peak, refined twice around the best."""
    if len(samples) < 6:
        raise ConfigError(f"calibration needs at least 6 measured steps, got {len(samples)}")
    features = [Features.of(s.chunks) for s in samples]
    seconds = np.array([s.seconds for s in samples])
    lo, hi = math.log(peak_flops * 1e-3), math.log(peak_flops * 4)
    best: tuple[float, float, np.ndarray] | None = None
    for _ in range(3):  # a coarse grid, then two finer ones around the best point
        for lfl in np.linspace(lo, hi, 48):
            err, x = _fit_at(features, seconds, geometry, peak_bandwidth, math.exp(lfl))
            if best is None or err < best[0]:
                best = (err, float(lfl), x)
        assert best is not None
        width = (hi - lo) / 16
        lo, hi = best[1] - width, best[1] + width
    assert best is not None
    _, lfl, x = best
    coefficients = Coefficients(step_s=float(x[0]), per_seq_s=float(x[1]), per_sample_s=float(x[2]),
                                weight_bandwidth=peak_bandwidth, linear_flops=math.exp(lfl),
                                attention_s_per_flop=float(x[3]), kv_s_per_byte=float(x[4]))
    model = StepTimeModel(coefficients, geometry)
    errors = [model.features_seconds(f) / float(s) - 1.0 for f, s in zip(features, seconds, strict=True)]
    return Fit(coefficients, errors)


def fit_curve(samples: Sequence[Sample]) -> tuple[CurveModel, list[float]]:
    """The measured-curve model of these samples, by non-negative least squares on relative
    error; knots at every token count measured. Returns it and its relative errors."""
    tokens = sorted({sum(c.new for c in s.chunks) for s in samples})
    if len(tokens) < 2:
        raise ConfigError("calibration needs steps of at least two different token counts")
    knots = tuple(tokens)
    a = np.array([curve_terms(s.chunks, knots) for s in samples])
    seconds = np.array([s.seconds for s in samples])
    weighted = a / seconds[:, None]
    scale = weighted.max(axis=0)
    scale[scale == 0] = 1.0
    x = nnls(weighted / scale, np.ones(len(samples))) / scale
    model = CurveModel(knots, tuple(float(v) for v in x))
    errors = [model.step_seconds(s.chunks) / s.seconds - 1.0 for s in samples]
    return model, errors


# ----- the calibration file ----------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """A fit and what it was measured on: `llmscale profile --calibrate --out calib.json`."""

    coefficients: Coefficients
    model: str
    dtype: str  # the weights' dtype as the engine ran them
    weight_format: str  # fp32 | bf16 | int8 | int4: which WEIGHT_BYTES the fit's geometry used
    cpu: str
    threads: int
    peak_bandwidth: float
    peak_flops: float
    mean_abs_error: float  # of the roofline fit (`coefficients`)
    max_abs_error: float
    curve_knots: list[int]  # the measured curve (`CurveModel`) of this model and dtype
    curve_coefficients: list[float]
    curve_mean_abs_error: float
    curve_max_abs_error: float
    serving: dict[str, float]  # ServingOverhead's fields: what `llmscale serve` adds
    first_run: dict[str, float]  # FirstRun's fields: a prefill step's first run of its token count
    samples: list[dict[str, Any]]

    def curve(self) -> CurveModel:
        return CurveModel(tuple(self.curve_knots), tuple(self.curve_coefficients))

    def serving_overhead(self) -> ServingOverhead:
        return ServingOverhead(**self.serving)

    def served(self, engine: StepModel) -> Served:
        """`engine` as a fresh server runs it (see `Served`)."""
        return Served(engine, self.serving_overhead(), FirstRun(**self.first_run))

    def write(self, path: Path) -> None:
        doc = asdict(self) | {"version": CALIBRATION_VERSION, "coefficients": self.coefficients.to_json()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))

    @classmethod
    def read(cls, path: Path) -> Calibration:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--calibration {path}: cannot read it ({e})") from None
        if not isinstance(doc, dict) or doc.get("version") != CALIBRATION_VERSION:
            raise ConfigError(f"--calibration {path}: not a calibration file of version "
                              f"{CALIBRATION_VERSION} (make one with `llmscale profile --calibrate`)")
        doc.pop("version")
        try:
            doc["coefficients"] = Coefficients.from_json(doc["coefficients"])
            calibration = cls(**doc)
            calibration.served(calibration.curve())  # its fields, checked before a run needs them
            return calibration
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"--calibration {path}: malformed ({e})") from None


# ----- `llmscale profile --calibrate` --------------------------------------------------------

def weight_format_of(engine: Any) -> str:
    """Which of step_model.WEIGHT_BYTES the engine's linears are closest to."""
    from llmscale.bench.profile import torch_elem_bytes

    cost = geometry_of_engine(engine)
    per_weight = cost.body_bytes / (cost.body_flops_per_token / 2)
    if per_weight < 0.8:
        return "int4"
    if per_weight < 1.5:
        return "int8"
    return "bf16" if torch_elem_bytes(engine.dtype) == 2 else "fp32"


def calibration_engine(model: str | None, dtype: str, device: str | None, max_len: int) -> Any:
    """A server's engine (online, streaming text) with room for every calibration shape."""
    from llmscale.config import EngineConfig
    from llmscale.engine.llm_engine import LLMEngine
    from llmscale.engine.runner import kv_bytes_per_block
    from llmscale.model.loader import read_model_config
    from llmscale.model.lookup import resolve_model

    model_cfg = read_model_config(resolve_model(model))
    max_len = model_cfg.context_len(max_len)
    block_size = 16
    probe = EngineConfig.from_kwargs(dtype=dtype, device=device)
    per_block = kv_bytes_per_block(model_cfg, block_size, probe.activation_dtype)
    max_tokens, max_seqs = max(TOKEN_GRID) + max(DECODE_BATCHES), max(DECODE_BATCHES) + 1
    blocks = blocks_for(default_shapes(max_len, max_tokens, max_seqs), block_size) + 64
    config = EngineConfig.from_kwargs(model=model, dtype=dtype, device=device, max_model_len=max_len,
                                      kv_cache_memory=blocks * per_block, block_size=block_size,
                                      max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs,
                                      enable_prefix_caching=False)
    engine = LLMEngine(config, stream_text=True, online=True)
    age(engine.kv.pool, random.Random(0))
    return engine


AGED_IN_FLIGHT = 24  # requests holding blocks at once while the calibration pool is aged
AGED_TURNS = 2  # times every block of the pool is handed out before the pool counts as aged


def age(pool: BlockPool, rng: random.Random, in_flight: int = AGED_IN_FLIGHT,
        turns: int = AGED_TURNS) -> None:
    """Leave `pool`'s free list as a server's is once requests came and went long enough to
    hand out every block `turns` times: each request takes its prompt's blocks at once, then a
    block at a time as it decodes beside the others, and gives them back when it ends. A fresh
    pool hands each request neighbouring blocks; a served one hands out runs broken wherever
    other requests grew, which the decode kernel reads slower (BENCHMARKS.md, "KV block
    order"): the calibration's steps are timed on blocks as a server holds them."""
    live: list[tuple[list[KVBlock], int]] = []  # blocks held, blocks still to grow
    handed_out = 0
    while handed_out < turns * pool.num_blocks or live:
        while handed_out < turns * pool.num_blocks and len(live) < in_flight:
            prompt, grow = rng.randint(4, 25), rng.randint(0, 6)  # 64-400 prompt, <= 96 new tokens
            if prompt + grow > pool.num_free_blocks:
                raise ConfigError(f"the calibration KV cache holds {pool.num_blocks} blocks: too few to age")
            live.append((pool.allocate(prompt), grow))
            handed_out += prompt + grow
        i = rng.randrange(len(live))  # one of them grows a block, or ends
        blocks, grow = live[i]
        if grow:
            live[i] = (blocks + pool.allocate(1), grow - 1)
        else:
            pool.free(blocks[::-1])  # tail first, as the KV cache manager frees
            live.pop(i)


def calibrate(model: str | None, dtype: str, device: str | None, repeats: int = 5,
              max_len: int = MAX_LEN) -> tuple[Calibration, CurveModel]:
    """Measure this machine and fit both models; shows progress."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmscale.bench.roofline import measure_peaks
    from llmscale.config import cpu_model_name
    from llmscale.plan import serving

    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as progress:
        task = progress.add_task("load + peaks", total=1)
        engine = calibration_engine(model, dtype, device, max_len)
        peaks = measure_peaks(engine.model.activation_dtype, engine.device)
        cpu = cpu_model_name() if engine.device.type == "cpu" else torch.cuda.get_device_name(engine.device)
        model_name, engine_dtype = engine.model_name, str(engine.dtype).removeprefix("torch.")
        weight_format = weight_format_of(engine)
        progress.advance(task)
        shapes = default_shapes(engine.max_model_len, engine.scheduler.config.max_num_batched_tokens,
                                engine.scheduler.config.max_num_seqs)
        task = progress.add_task("step shapes", total=len(shapes) * repeats)
        samples = measure(engine, shapes, repeats, lambda: progress.advance(task))
        first_run = measure_first_run(engine, shapes, engine.scheduler.config.max_num_batched_tokens)
        geometry = geometry_of_engine(engine)
        physical = fit(samples, geometry, peaks.memory_bytes, peaks.matmul_flops)
        curve, curve_errors = fit_curve(samples)
        task = progress.add_task("served", total=serving.MEASURE_STAGES)
        serve_args = ["--dtype", dtype] + (["--model", model] if model else []) + \
            (["--device", device] if device else [])
        prompts = PromptSource(corpus_tokens(engine.tokenizer), random.Random(1))

        def run_once(shape: Sequence[Chunk]) -> float:  # this engine stays idle while the server runs
            return run_shape(engine, shape, prompts, "served")

        overhead = serving.measure(serve_args, run_once, engine.tokenizer, lambda: progress.advance(task))
    calibration = Calibration(
        coefficients=physical.coefficients, model=model_name, dtype=engine_dtype, weight_format=weight_format,
        cpu=cpu, threads=torch.get_num_threads(),
        peak_bandwidth=peaks.memory_bytes, peak_flops=peaks.matmul_flops,
        mean_abs_error=physical.mean_abs_error, max_abs_error=physical.max_abs_error,
        curve_knots=list(curve.knots), curve_coefficients=list(curve.coefficients),
        curve_mean_abs_error=float(np.mean(np.abs(curve_errors))),
        curve_max_abs_error=float(np.max(np.abs(curve_errors))),
        serving=asdict(overhead), first_run=asdict(first_run),
        samples=[{"chunks": [[c.context, c.new, c.samples] for c in s.chunks], "seconds": s.seconds,
                  "curve_error": ce, "roofline_error": pe}
                 for s, ce, pe in zip(samples, curve_errors, physical.relative_errors, strict=True)])
    return calibration, curve


def run_calibration(args: Any) -> Calibration:
    """`llmscale profile --calibrate`: measure, fit, print the fit, write the file and a PNG."""
    from llmscale.console import stdout_console

    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / "calib.json"
    calibration, _ = calibrate(args.model, args.dtype, args.device, args.repeats)
    calibration.write(path)
    png = path.with_suffix(".png")
    plot_fit(calibration, png)
    console = stdout_console()
    print_fit(calibration, console)
    console.print(f"wrote {path} and {png}")
    return calibration


def _shape_label(chunks: list[list[Any]]) -> str:
    decodes = [c for c in chunks if c[1] == 1]
    prefills = [c for c in chunks if c[1] > 1]
    parts = []
    if decodes:
        parts.append(f"{len(decodes)} decode @ {decodes[0][0]}")
    parts += [f"prefill {c[1]} @ {c[0]}" for c in prefills]
    return " + ".join(parts)


def print_fit(calibration: Calibration, console: Any) -> None:
    from rich.table import Table

    c = calibration.coefficients
    console.print(
        f"[bold]{calibration.model}[/] {calibration.dtype} on {calibration.cpu} "
        f"({calibration.threads} threads): "
        f"measured curve |error| mean {calibration.curve_mean_abs_error:.1%}, max "
        f"{calibration.curve_max_abs_error:.1%}; roofline fit mean {calibration.mean_abs_error:.1%}, max "
        f"{calibration.max_abs_error:.1%}")
    console.print(
        f"roofline fit: step {c.step_s * 1e3:.2f} ms + {c.per_seq_s * 1e6:.0f} us/sequence; weights "
        f"stream at the measured DRAM bandwidth, {c.weight_bandwidth / 1e9:.0f} GB/s; "
        f"linears reach {c.linear_flops / 1e9:.0f} GFLOP/s "
        f"({c.linear_flops / calibration.peak_flops:.0%} of the GEMM peak)")
    served = calibration.serving_overhead()
    console.print(
        f"serving over HTTP adds {served.step_s * 1e3:.2f} ms per step, "
        f"{served.per_token_s * 1e3:.3f} ms per streamed token, {served.first_token_s * 1e3:.2f} ms to the "
        f"step after a request's first token and {served.finished_s * 1e3:.2f} ms to the step after its "
        f"last, and {served.request_s * 1e3:.1f} ms per request on its way in "
        f"({served.busy_request_s * 1e3:.1f} ms while the engine steps)")
    first = FirstRun(**calibration.first_run)
    console.print(
        f"a prefill step at a token count the engine has not run yet takes {first.step_s * 1e3:.1f} ms + "
        f"{first.per_token_s * 1e6:.1f} us per token more (e.g. {first.seconds(200) * 1e3:.1f} ms at 200)")
    table = Table(title="measured step shapes: time and the two models' relative error")
    for col in ("shape", "ms", "curve", "roofline"):
        table.add_column(col, justify="left" if col == "shape" else "right")
    for s in calibration.samples:
        table.add_row(_shape_label(s["chunks"]), f"{s['seconds'] * 1e3:.1f}", f"{s['curve_error']:+.1%}",
                      f"{s['roofline_error']:+.1%}")
    console.print(table)


def plot_fit(calibration: Calibration, path: Path) -> None:
    """Predicted against measured step time for both models, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [s["seconds"] * 1e3 for s in calibration.samples]
    fig, ax = plt.subplots(figsize=(6.5, 6))
    models = (("curve_error", "measured curve", "o"), ("roofline_error", "roofline fit", "x"))
    for key, name, marker in models:
        ax.scatter(measured, [m * (1 + s[key]) for m, s in zip(measured, calibration.samples, strict=True)],
                   marker=marker, s=22, label=name)
    lo, hi = min(measured) / 1.3, max(measured) * 1.3
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="gray", alpha=0.15,
                    label="within 10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(f"{calibration.model} {calibration.dtype} on {calibration.cpu}: step-time fit", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
