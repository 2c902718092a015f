"""What serving over HTTP adds to the engine's steps, measured through a real `llmscale serve`.

The engine shares this machine's cores with the HTTP server's event loop (every token becomes
an SSE event) and with the client. On a few cores that shows in every step: the measured
inter-token gap of b streams exceeds the engine's own step time for b decodes by a fixed
cost per step plus a cost per streamed token. `measure` starts the server as a subprocess on
a free loopback port, streams b = 1..32 concurrent requests, and fits both costs (least
squares, non-negative); a lone request's time to first token less its prefill step gives the
request's own overhead (HTTP, tokenizing): the median of a few sent one after another, the
first left out (its prompt length is new to the kernels). The same requests sent while one
other stream decodes take longer to reach the engine: their parsing and tokenizing wait for
cores the step's threads hold.

Every served time is set against the same shape timed in an engine with nothing else running
(`time_shape`) just before: a shared host's speed drifts by 15% within minutes, and against a
curve fitted a minute earlier that drift would read as serving overhead.
"""

from __future__ import annotations

import asyncio
import functools
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from llmscale.bench.roofline import Chunk
from llmscale.config import ConfigError
from llmscale.plan.simulator import RequestOverhead
from llmscale.plan.step_model import StepModel
from llmscale.serve.process import free_port, start_server, stop_server, wait_ready

if TYPE_CHECKING:
    from llmscale.model.tokenizer import Tokenizer

BATCHES = (1, 2, 4, 8, 16, 32)
PROMPT_TOKENS = 200
OUTPUT_TOKENS = 48
SKIP_TOKENS = 8  # gaps while other streams still prefill are not steady decode steps
LONE_REQUESTS = 12  # per state (idle, busy): their medians move by a few ms with 6
BACKGROUND_TOKENS = 400  # the stream that keeps the engine busy outlasts the lone requests
BACKGROUND_LEAD_S = 0.5  # its prefill done before the first lone request


@dataclass(frozen=True)
class ServingOverhead:
    step_s: float  # added to every step
    per_token_s: float  # added per token streamed in the step
    request_s: float  # a request's way in: HTTP, tokenizing, queueing into an idle engine
    busy_request_s: float  # the same while the engine steps, whose threads hold the cores

    def request_overhead(self) -> RequestOverhead:
        return RequestOverhead(self.request_s, self.busy_request_s)

    def step_added(self, sampled: int) -> float:
        """What serving adds to a step that samples this many rows."""
        return self.step_s + self.per_token_s * sampled


@dataclass(frozen=True)
class FirstRun:
    """What a step whose token count the process has not run before costs on top: oneDNN builds
    its GEMM primitives per row count on first use, so a fresh server's first prefill chunk of
    each length pays it once. Decode-only steps run the fused C step, which builds nothing."""

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


async def _round(url: str, model: str, tokenizer: Tokenizer, batch: int, first: int) -> float:
    """Median steady gap between tokens of `batch` concurrent streams."""
    import httpx

    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        streams = await asyncio.gather(*[_stream(client, url, model, prompt_text(tokenizer, first + i))
                                         for i in range(batch)])
    steady = [stamps[SKIP_TOKENS:] for stamps in streams]
    gaps = [b - a for s in steady for a, b in zip(s, s[1:], strict=False)]
    if not gaps:
        raise ConfigError("the calibration server streamed no tokens")
    return statistics.median(gaps)


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


def measure(serve_args: list[str], time_shape: Callable[[Sequence[Chunk]], float], tokenizer: Tokenizer,
            advance: Callable[[], None] = lambda: None) -> ServingOverhead:
    """Start `llmscale serve` with `serve_args`, measure, stop it, fit. `time_shape` times one
    step of a shape in an engine of the same model with nothing else running, now."""
    busy_first = 2 + LONE_REQUESTS  # its background stream's prompt is the one before
    rounds_first = busy_first + LONE_REQUESTS
    prompts = [len(tokenizer.encode(prompt_text(tokenizer, i))) for i in range(rounds_first + sum(BATCHES))]
    context = round(statistics.mean(prompts)) + (SKIP_TOKENS + OUTPUT_TOKENS) // 2
    decode = Chunk(context, 1, True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, serve_args)
    try:
        model = wait_ready(url, proc)
        asyncio.run(_round(url, model, tokenizer, 1, 0))  # warm-up
        advance()
        lone_engine = [time_shape([Chunk(0, prompts[1 + i], True)]) for i in range(LONE_REQUESTS)]
        ttfts = asyncio.run(_lone_ttfts(url, model, tokenizer, 1, busy=False))
        decode_engine = time_shape([decode])
        busy_engine = [time_shape([decode, Chunk(0, prompts[busy_first + i], True)])
                       for i in range(LONE_REQUESTS)]
        busy_ttfts = asyncio.run(_lone_ttfts(url, model, tokenizer, busy_first, busy=True))
        rows = []
        sent = rounds_first
        for b in BATCHES:
            engine_s = time_shape([decode] * b)
            rows.append((b, asyncio.run(_round(url, model, tokenizer, b, sent)) - engine_s))
            sent += b
            advance()
    finally:
        stop_server(proc)
    from llmscale.plan.calibrate import nnls

    a = np.array([[1.0, float(b)] for b, _ in rows])
    step_s, per_token_s = (float(x) for x in nnls(a, np.array([excess for _, excess in rows])))
    steps = ServingOverhead(step_s, per_token_s, 0.0, 0.0)  # what serving adds to steps

    # Each lone request's TTFT less its own prefill step as served; the first is left out (its
    # kernels' first call at a new row count), the median of the rest kept.
    lone = [ttft - engine_s - steps.step_added(1) for ttft, engine_s in zip(ttfts, lone_engine, strict=True)]
    request_s = max(0.0, statistics.median(lone[1:]))
    # Beside a decoding stream a request waits, on average, half that stream's step, then
    # prefills in a step with it; what is left is its way in while the engine steps.
    busy = [ttft - (decode_engine + steps.step_added(1)) / 2 - (engine_s + steps.step_added(2))
            for ttft, engine_s in zip(busy_ttfts, busy_engine, strict=True)]
    busy_request_s = max(request_s, statistics.median(busy))
    return replace(steps, request_s=request_s, busy_request_s=busy_request_s)
