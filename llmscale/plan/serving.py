"""What serving over HTTP adds to the engine's steps, measured through a real `llmscale serve`.

The engine shares this machine's cores with the HTTP server's event loop (every token becomes
an SSE event) and with the client. On a few cores that shows in every step: the measured
inter-token gap of b streams exceeds the engine's own step time for b decodes by a fixed
cost per step plus a cost per streamed token. `measure` starts the server as a subprocess on
a free loopback port, streams b = 1..32 concurrent requests, and fits both costs (least
squares, non-negative) against the calibrated curve; a lone request's time to first token
less its prefill step gives the request's own overhead (HTTP, tokenizing): the median of a
few sent one after another, the first left out (its prompt length is new to the kernels).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmscale.bench.roofline import Chunk
from llmscale.config import ConfigError
from llmscale.model.tokenizer import Tokenizer
from llmscale.plan.step_model import StepModel

BATCHES = (1, 2, 4, 8, 16, 32)
PROMPT_TOKENS = 200
OUTPUT_TOKENS = 48
SKIP_TOKENS = 8  # gaps while other streams still prefill are not steady decode steps
LONE_REQUESTS = 6


@dataclass(frozen=True)
class ServingOverhead:
    step_s: float  # added to every step
    per_token_s: float  # added per token streamed in the step
    request_s: float  # a request's way in: HTTP, tokenizing, queueing into the engine


@dataclass(frozen=True)
class Served:
    """A step model as a server runs it: the engine's time plus what serving adds."""

    engine: StepModel
    overhead: ServingOverhead

    def step_seconds(self, chunks: Sequence[Chunk]) -> float:
        if not chunks:
            return 0.0
        sampled = sum(1 for c in chunks if c.samples)
        return self.engine.step_seconds(chunks) + self.overhead.step_s + self.overhead.per_token_s * sampled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def _corpus_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    from llmscale.bench.profile import CORPUS

    return tuple(tokenizer.encode(CORPUS.read_text()[:200_000], add_special_tokens=False))


def prompt_text(tokenizer: Tokenizer, i: int) -> str:
    """The i-th window of PROMPT_TOKENS tokens of the shipped corpus, as text: real text, no two
    windows sharing a prefix block, all (nearly) one length. Measured on prompts of varying
    length the request overhead read three times what a server, timed inside, spends between
    a request's arrival and its engine step (BENCHMARKS.md, planner)."""
    ids = _corpus_ids(tokenizer)
    start = (i * (PROMPT_TOKENS + 7)) % (len(ids) - PROMPT_TOKENS)
    return tokenizer.decode(list(ids[start:start + PROMPT_TOKENS]))


async def _stream(client: object, url: str, model: str, prompt: str, gaps: list[float],
                  ttfts: list[float], max_tokens: int = OUTPUT_TOKENS) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0.0}
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:  # type: ignore[attr-defined]
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    if stamps:
        ttfts.append(stamps[0] - start)
    gaps += [b - a for a, b in zip(stamps[SKIP_TOKENS:], stamps[SKIP_TOKENS + 1:], strict=False)]


async def _round(url: str, model: str, tokenizer: Tokenizer, batch: int, first: int) -> tuple[float, float]:
    """Median steady gap between tokens of `batch` concurrent streams, and the median TTFT."""
    import httpx

    gaps: list[float] = []
    ttfts: list[float] = []
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        await asyncio.gather(*[_stream(client, url, model, prompt_text(tokenizer, first + i), gaps, ttfts)
                               for i in range(batch)])
    if not gaps:
        raise ConfigError("the calibration server streamed no tokens")
    return statistics.median(gaps), statistics.median(ttfts)


async def _lone_ttfts(url: str, model: str, tokenizer: Tokenizer, first: int) -> list[float]:
    """Time to first token of requests sent one at a time."""
    import httpx

    ttfts: list[float] = []
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        for i in range(LONE_REQUESTS):
            await _stream(client, url, model, prompt_text(tokenizer, first + i), [], ttfts, max_tokens=2)
    return ttfts


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300.0) -> str:
    """Poll until the server answers /v1/models; the name of the model it serves."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"the calibration server exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}/v1/models", timeout=2, trust_env=False)
            if r.status_code == 200:
                return str(r.json()["data"][0]["id"])
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ConfigError("the calibration server did not start within 5 minutes")


def start_server(port: int, serve_args: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """`llmscale serve` on 127.0.0.1:`port` in a child process (its output to `log`, or dropped)."""
    cmd = [sys.executable, "-c", "from llmscale.cli import main; main()", "serve", "-q",
           "--host", "127.0.0.1", "--port", str(port), *serve_args]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(serve_args: list[str], engine_model: StepModel, tokenizer: Tokenizer,
            advance: Callable[[], None] = lambda: None) -> ServingOverhead:
    """Start `llmscale serve` with `serve_args`, measure, stop it, fit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, serve_args)
    try:
        model = wait_ready(url, proc)
        asyncio.run(_round(url, model, tokenizer, 1, 0))  # warm-up
        advance()
        ttfts = asyncio.run(_lone_ttfts(url, model, tokenizer, 1))
        rows = []
        sent = 1 + LONE_REQUESTS
        for b in BATCHES:
            gap, _ = asyncio.run(_round(url, model, tokenizer, b, sent))
            sent += b
            rows.append((b, gap))
            advance()
    finally:
        stop_server(proc)
    prompts = [len(tokenizer.encode(prompt_text(tokenizer, i))) for i in range(sent)]
    context = round(statistics.mean(prompts)) + (SKIP_TOKENS + OUTPUT_TOKENS) // 2
    engine = np.array([engine_model.step_seconds([Chunk(context, 1, True)] * b) for b, _ in rows])
    excess = np.array([gap for _, gap in rows]) - engine
    a = np.array([[1.0, float(b)] for b, _ in rows])
    from llmscale.plan.calibrate import nnls

    step_s, per_token_s = nnls(a, excess)
    # Each lone request's TTFT less its own prefill step; the first is left out (its kernels'
    # first call at a new row count), the median of the rest kept.
    lone = [ttft - engine_model.step_seconds([Chunk(0, prompts[1 + i], True)]) - step_s - per_token_s
            for i, ttft in enumerate(ttfts)]
    request_s = max(0.0, statistics.median(lone[1:]))
    return ServingOverhead(float(step_s), float(per_token_s), float(request_s))
