"""What serving over HTTP adds to the engine's steps, measured through a real `llmscale serve`.

The engine shares this machine's cores with the HTTP server's event loop (every token becomes
an SSE event) and with the client. On a few cores that shows in every step. `measure` starts
the server as a subprocess on a free loopback port with its steps logged, and sends it a
Poisson load from `llmscale bench serve`'s own client, at a light and a heavy rate, with
lengths unlike the validation's, and all at once. Requests arrive and leave while it runs, as
in any served load; steps in lockstep rounds, where nobody does, miss what their coming and
going costs. Once the server is gone, each of the load's decode-only steps that began as the
previous one ended is replayed, shape for shape and in order, in the idle calibration engine;
its excess is fitted (least squares, non-negative) as a fixed cost per step, a cost per
streamed token, and what the server's work on the previous step's outputs costs (a request's
first token, a finished request): the simulator's `Handoff`.

A lone request's time to first token less its prefill step gives the request's own overhead
(HTTP, tokenizing): the median of a few sent one after another, the first left out (its
prompt length is new to the kernels). The same requests sent while one other stream decodes
take longer to reach the engine: their parsing and tokenizing wait for cores the step's
threads hold.

Every served time is set against the same shapes timed in an engine with nothing else running
within a minute of it, never against the calibrated curve: a shared host's speed drifts by 15%
within minutes, and against a curve fitted earlier that drift would read as serving overhead.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmscale.bench.lengths import LengthDist
from llmscale.bench.roofline import Chunk
from llmscale.config import ConfigError
from llmscale.plan.simulator import Handoff, RequestOverhead
from llmscale.plan.step_model import StepModel
from llmscale.serve.process import free_port, start_server, stop_server, wait_ready

if TYPE_CHECKING:
    from llmscale.bench.client import Target
    from llmscale.bench.datasets import BenchRequest
    from llmscale.model.tokenizer import Tokenizer

PROMPT_TOKENS = 200
OUTPUT_TOKENS = 48
LONE_REQUESTS = 12  # per state (idle, busy): their medians move by a few ms with 6
BACKGROUND_TOKENS = 400  # the stream that keeps the engine busy outlasts the lone requests
BACKGROUND_LEAD_S = 0.5  # its prefill done before the first lone request
# The load: lengths unlike the validation's (bench serve's 256/64 default, lognormal, shared
# prefixes), at shares of what the engine alone could serve (a light one, one near saturation)
# and all at once.
LOAD_PROMPT = LengthDist("uniform", 64, 320)
LOAD_OUTPUT = LengthDist("uniform", 16, 128)
LOAD_REQUESTS = 32  # per rate
LOAD_SHARES = (0.3, 0.8, math.inf)  # the last: all at once, for batches as big as a burst makes
LOAD_SEED = 9_000  # prompts no other part of the calibration sends
BACK_TO_BACK_S = 0.001  # a step that began within this of the previous one's end: no idle between
MIN_FIT_STEPS = 40


@dataclass(frozen=True)
class ServingOverhead:
    step_s: float  # added to every step
    per_token_s: float  # added per token streamed in the step
    first_token_s: float  # added to the step after one that gave a request its first token, per request
    finished_s: float  # added to the step after one that finished a request, per request
    request_s: float  # a request's way in: HTTP, tokenizing, queueing into an idle engine
    busy_request_s: float  # the same while the engine steps, whose threads hold the cores

    def request_overhead(self) -> RequestOverhead:
        return RequestOverhead(self.request_s, self.busy_request_s)

    def handoff(self) -> Handoff:
        return Handoff(self.first_token_s, self.finished_s)

    def step_added(self, sampled: int) -> float:
        """What serving adds to a step that samples this many rows."""
        return self.step_s + self.per_token_s * sampled


@dataclass(frozen=True)
class FirstRun:
    """What a step whose token count the process has not run before costs on top: where a
    linear runs oneDNN (e.g. prefill chunks of bf16 weights on a CPU without AVX-512 BF16), oneDNN
    builds its GEMM primitives per row count on first use, so a fresh server's first prefill
    chunk of each length pays it once. The C kernels build nothing, so where they run every
    linear this measures near zero. Decode-only steps run the fused C step."""

    step_s: float = 0.0
    per_token_s: float = 0.0

    def seconds(self, tokens: int) -> float:
        return self.step_s + self.per_token_s * tokens


@dataclass(frozen=True)
class Served:
    """A step model as a server runs it: the engine's time plus what serving adds, and the first
    run of each token count of the steps that hold a prefill chunk (`seen`: one server's)."""

    engine: StepModel
    overhead: ServingOverhead
    first_run: FirstRun = FirstRun()
    seen: set[int] = field(default_factory=set, compare=False)

    def step_seconds(self, chunks: Sequence[Chunk]) -> float:
        if not chunks:
            return 0.0
        sampled = sum(1 for c in chunks if c.samples)
        seconds = self.engine.step_seconds(chunks) + self.overhead.step_added(sampled)
        tokens = sum(c.new for c in chunks)
        if tokens not in self.seen and any(c.new > 1 for c in chunks):
            self.seen.add(tokens)
            seconds += self.first_run.seconds(tokens)
        return seconds


@functools.cache
def _corpus_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    from llmscale.bench.profile import corpus_tokens

    return tuple(corpus_tokens(tokenizer))


def prompt_text(tokenizer: Tokenizer, i: int) -> str:
    """The i-th window of PROMPT_TOKENS tokens of the shipped corpus, as text: real text, no two
    windows sharing a prefix block, all (nearly) one length. Measured on prompts of varying
    length the request overhead read three times what a server, timed inside, spends between
    a request's arrival and its engine step (BENCHMARKS.md, planner)."""
    ids = _corpus_ids(tokenizer)
    start = (i * (PROMPT_TOKENS + 7)) % (len(ids) - PROMPT_TOKENS)
    return tokenizer.decode(list(ids[start:start + PROMPT_TOKENS]))


async def _stream(client: object, url: str, model: str, prompt: str, max_tokens: int = OUTPUT_TOKENS
                  ) -> list[float]:
    """When each streamed token arrived, in seconds from the send."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0.0}
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:  # type: ignore[attr-defined]
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter() - start)
    return stamps


async def _warm_up(url: str, model: str, tokenizer: Tokenizer) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        if not await _stream(client, url, model, prompt_text(tokenizer, 0)):
            raise ConfigError("the calibration server streamed no tokens")


async def _lone_ttfts(url: str, model: str, tokenizer: Tokenizer, first: int, busy: bool) -> list[float]:
    """Time to first token of requests sent one at a time; with `busy`, while one other stream
    decodes, each sent at a (seeded) random phase of its steps."""
    import httpx

    ttfts: list[float] = []
    rng = random.Random(first)
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        background = None
        if busy:
            background = asyncio.create_task(_stream(client, url, model, prompt_text(tokenizer, first - 1),
                                                     max_tokens=BACKGROUND_TOKENS))
            await asyncio.sleep(BACKGROUND_LEAD_S)
        for i in range(LONE_REQUESTS):
            if busy:
                await asyncio.sleep(rng.uniform(0.02, 0.1))
            stamps = await _stream(client, url, model, prompt_text(tokenizer, first + i), max_tokens=2)
            ttfts += stamps[:1]
        if background is not None:
            background.cancel()  # the server aborts it when the stream closes
            await asyncio.gather(background, return_exceptions=True)
    return ttfts


@dataclass(frozen=True)
class LoggedStep:
    """One line of `llmscale serve --log-steps`: when the step ended, its seconds, its chunks."""

    ended_s: float
    seconds: float
    chunks: tuple[Chunk, ...]

    @classmethod
    def parse(cls, line: str) -> LoggedStep:
        ended, seconds, chunks = json.loads(line)
        return cls(float(ended), float(seconds), tuple(Chunk(*c) for c in chunks))

    def idle_before(self, before: LoggedStep) -> float:
        """How long the engine idled between `before`'s end and this step's start."""
        return self.ended_s - self.seconds - before.ended_s


def handed_over(before: LoggedStep, step: LoggedStep) -> tuple[int, int]:
    """The first tokens and finished requests a logged step handed the server, as read from the
    step after it: each of its chunks that sampled after a prefill gave a first token; the rows
    it sampled that do not decode in the next step finished (a preempted request would count as
    finished: rare, and the scheduler's doing)."""
    sampled = sum(1 for c in before.chunks if c.samples)
    first_tokens = sum(1 for c in before.chunks if c.samples and c.new > 1)
    return first_tokens, max(0, sampled - sum(1 for c in step.chunks if c.new == 1))


def served_terms(steps: Sequence[LoggedStep], engine_seconds: Callable[[Sequence[Chunk]], float]
                 ) -> ServingOverhead:
    """Fit the step terms of `ServingOverhead` to a served load's steps: each decode-only step
    that began as the one before ended, less what the engine alone takes for its shape
    (`engine_seconds`, called once per such step, in order), against [1, tokens streamed, first
    tokens and finished requests of the step before (`handed_over`)]."""
    from llmscale.plan.calibrate import nnls

    rows, excess = [], []
    for before, step in zip(steps, steps[1:], strict=False):
        if step.idle_before(before) > BACK_TO_BACK_S or any(c.new > 1 for c in step.chunks):
            continue
        first_tokens, finished = handed_over(before, step)
        streamed = sum(1 for c in step.chunks if c.samples)
        rows.append([1.0, float(streamed), float(first_tokens), float(finished)])
        excess.append(step.seconds - engine_seconds(step.chunks))
    if len(rows) < MIN_FIT_STEPS:
        raise ConfigError(f"the calibration server ran {len(rows)} back-to-back decode steps under load; "
                          f"too few to fit what serving adds")
    terms = (float(x) for x in nnls(np.array(rows), np.array(excess)))
    return ServingOverhead(*terms, request_s=0.0, busy_request_s=0.0)


async def _load(target: Target, requests: list[BenchRequest], rate: float, seed: int) -> None:
    """One Poisson run of `requests` at `rate` from bench serve's client; every one must succeed."""
    import httpx

    from llmscale.bench.load import LoadPlan, Stop, run_one

    plan = LoadPlan([rate], len(requests), seed=seed, warmup=0)
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        run = await run_one(client, target, requests, rate, plan, seed, Stop(), lambda: None, "calibration")
    failed = [r for r in run.requests if not r.success]
    if failed:
        raise ConfigError(f"the calibration server failed {len(failed)} of {len(requests)} requests "
                          f"under load: {failed[0].error}")


def measure(serve_args: list[str], run_shape: Callable[[Sequence[Chunk]], float], tokenizer: Tokenizer,
            advance: Callable[[], None] = lambda: None) -> ServingOverhead:
    """Start `llmscale serve` with `serve_args`, measure, stop it, fit. `run_shape` times one
    step of a shape in an engine of the same model with nothing else running, now: the load's
    steps are replayed on it once the server is gone."""
    from llmscale.bench.client import Target
    from llmscale.bench.datasets import Codec, WorkloadSpec, make_requests

    def time_shape(shape: Sequence[Chunk]) -> float:
        return statistics.median(run_shape(shape) for _ in range(3))

    busy_first = 2 + LONE_REQUESTS  # its background stream's prompt is the one before
    prompts = [len(tokenizer.encode(prompt_text(tokenizer, i))) for i in range(busy_first + LONE_REQUESTS)]
    decode = Chunk(round(statistics.mean(prompts)) + OUTPUT_TOKENS // 2, 1, True)
    spec = WorkloadSpec(prompt_len=LOAD_PROMPT, output_len=LOAD_OUTPUT)
    loads = [make_requests(spec, Codec(tokenizer.backend), LOAD_REQUESTS, LOAD_SEED + i)
             for i in range(len(LOAD_SHARES))]
    # What the engine alone serves: a mean prompt's prefill plus a mean output's decodes in a
    # batch of 16; the load's rates are shares of it.
    mean_prompt = round(statistics.mean(r.prompt_len for load in loads for r in load))
    mean_output = statistics.mean(r.output_len for load in loads for r in load)
    per_request_s = time_shape([Chunk(0, mean_prompt, True)]) + mean_output * time_shape([decode] * 16) / 16
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="llmscale-calibration-") as tmp:
        log = Path(tmp) / "steps.jsonl"
        proc = start_server(port, [*serve_args, "--log-steps", str(log)])
        try:
            model = wait_ready(url, proc)
            asyncio.run(_warm_up(url, model, tokenizer))
            advance()
            lone_engine = [time_shape([Chunk(0, prompts[1 + i], True)]) for i in range(LONE_REQUESTS)]
            ttfts = asyncio.run(_lone_ttfts(url, model, tokenizer, 1, busy=False))
            advance()
            decode_engine = time_shape([decode])
            busy_engine = [time_shape([decode, Chunk(0, prompts[busy_first + i], True)])
                           for i in range(LONE_REQUESTS)]
            busy_ttfts = asyncio.run(_lone_ttfts(url, model, tokenizer, busy_first, busy=True))
            advance()
            load_start = log.stat().st_size  # the load's steps are the lines from here
            target = Target(url, model)
            for i, (share, requests) in enumerate(zip(LOAD_SHARES, loads, strict=True)):
                asyncio.run(_load(target, requests, share / per_request_s, LOAD_SEED + i))
                advance()
            with log.open("rb") as lines:
                lines.seek(load_start)
                steps = [LoggedStep.parse(line.decode()) for line in lines]
        finally:
            stop_server(proc)
    served = served_terms(steps, run_shape)
    advance()

    # Each lone request's TTFT less its own prefill step as served; the first is left out (its
    # kernels' first call at a new row count), the median of the rest kept.
    lone = [ttft - engine_s - served.step_added(1) for ttft, engine_s in zip(ttfts, lone_engine, strict=True)]
    request_s = max(0.0, statistics.median(lone[1:]))
    # Beside a decoding stream a request waits, on average, half that stream's step, then
    # prefills in a step with it; what is left is its way in while the engine steps.
    busy = [ttft - (decode_engine + served.step_added(1)) / 2 - (engine_s + served.step_added(2))
            for ttft, engine_s in zip(busy_ttfts, busy_engine, strict=True)]
    busy_request_s = max(request_s, statistics.median(busy))
    return replace(served, request_s=request_s, busy_request_s=busy_request_s)


MEASURE_STAGES = 4 + len(LOAD_SHARES)  # measure's calls of `advance`
