"""`llmscale cluster serve` autoscaled to its SLO on a local Ray cluster, as a user runs it:
zero replicas until the first request (which waits for one: the fallback is switched off),
the maximum under a burst that queues, back to zero when idle; each change printed with its
reason and exported in `/metrics` and `/cluster/status`. One cluster for the module (Ray and
each replica take seconds to start).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .test_cli import run_cli
from .test_cluster import HEADERS, _wait, cluster_serve_process
from .test_server import API_KEY, MODEL

MAX_SEQS = 4  # a replica runs 4 sequences and takes 8 requests: a burst of 24 queues
BURST = 24
FLAGS = ["--min-replicas", "0", "--max-replicas", "2", "--scale-to-zero-after-s", "3",
         "--downscale-delay-s", "2", "--upscale-delay-s", "0", "--target-ttft-ms", "5000",
         "--target-tpot-ms", "1000", "--max-num-seqs", str(MAX_SEQS), "--hardware-cost-per-hour", "0.5"]


def _autoscaler(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/cluster/status", headers=HEADERS, timeout=10).json()["autoscaler"]


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/cluster/status", headers=HEADERS, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def autoscaled_cluster(tmp_path_factory: pytest.TempPathFactory, *flags: str) -> Iterator[tuple[str, Path]]:
    """`llmscale cluster serve` with `flags`; yields (url, its stderr log) once the ingress answers."""
    flags = ("--kv-cache-memory", "64MiB", *flags)
    with cluster_serve_process(tmp_path_factory, list(flags), _answers, "the ingress") as (url, _, log_path):
        yield url, log_path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> Iterator[tuple[str, Path]]:
    # A fallback named but switched off: the first request after zero waits for the main model.
    off = ["--fallback-model", str(tiny_model("llama")), "--no-fallback-while-cold"]
    with autoscaled_cluster(tmp_path_factory, *FLAGS, *off) as started:
        yield started


def _complete(url: str, i: int, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers=HEADERS, timeout=300, json={
        "prompt": f"Request {i}: the history of the number {i * 7919} is", "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True})


def test_scales_from_zero_to_the_maximum_under_a_burst_and_back_to_zero(cluster: tuple[str, Path]) -> None:
    url, log_path = cluster
    start = _autoscaler(url)
    assert (start["ready_replicas"], start["min_replicas"], start["max_replicas"]) == (0, 0, 2)

    # The first request finds no replica: Serve starts one, and the request waits for it.
    first = _complete(url, 0, 4)
    assert first.status_code == 200, first.text
    assert first.headers["x-llmscale-replica"] == "replica-0"
    assert first.json()["model"] == MODEL
    replicas = httpx.get(f"{url}/cluster/status", headers=HEADERS, timeout=10).json()["replicas"]
    assert "fallback" not in {r["replica_id"] for r in replicas}

    # A burst that one replica queues, kept up until the autoscaler's second replica is ready,
    # then one more wave: every request is served, by both replicas.
    with ThreadPoolExecutor(BURST) as pool:
        futures: list[Future[httpx.Response]] = []

        def top_up(max_tokens: int) -> None:
            in_flight = sum(not f.done() for f in futures)
            futures.extend(pool.submit(_complete, url, len(futures) + 1, max_tokens)
                           for _ in range(BURST - in_flight))

        deadline = time.monotonic() + 180
        while _autoscaler(url)["ready_replicas"] < 2:
            assert time.monotonic() < deadline, "the second replica never became ready"
            top_up(96)
            time.sleep(0.5)
        futures.extend(pool.submit(_complete, url, len(futures) + 1, 16) for _ in range(BURST))
        answers = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    assert {r.headers["x-llmscale-replica"] for r in answers} == {"replica-0", "replica-1"}

    # Idle: down to one after the downscale delay, to zero after the scale-to-zero delay.
    _wait(lambda: _autoscaler(url)["ready_replicas"] == 0, "scale to zero", timeout_s=90)
    state = _autoscaler(url)
    assert state["desired_replicas"] == 0
    assert {"cold-start", "queue", "idle"} <= set(state["by_signal"])

    # /metrics reads the board's snapshot the ingress polls once a second.
    _wait(lambda: re.search(r"llmscale:autoscaler_ready_replicas\{.*\} 0\.0",
                            httpx.get(f"{url}/metrics", timeout=10).text), "metrics of zero replicas", 10)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert re.search(r"llmscale:autoscaler_desired_replicas\{.*\} 0\.0", metrics), metrics
    for name in ("cold-start", "queue", "idle"):
        pattern = rf'llmscale:autoscaler_decisions_total\{{.*signal="{name}".*\}} [1-9]'
        assert re.search(pattern, metrics), name

    # What the replicas cost, and how many requests met the SLO, as the ingress saw them.
    status = httpx.get(f"{url}/cluster/status", headers=HEADERS, timeout=10).json()
    held = status["spent"]["replica_seconds"]["engine"]
    assert held > 5 and status["spent"]["cost_usd"] == pytest.approx(held / 3600 * 0.5)
    slo = status["slo"]
    assert (slo["ttft_ms"], slo["tpot_ms"]) == (5000, 1000)
    assert slo["met"] + slo["missed"] == len(answers) + 1 and 0 <= slo["attainment"] <= 1
    out = run_cli("cluster", "status", "--url", url, "--api-key", API_KEY)
    assert out.returncode == 0, out.stderr
    assert re.search(r"replica-seconds: engine \d+ s \(\$0\.\d{4}\)", out.stdout), out.stdout
    assert re.search(r"autoscaler: 0 ready, 0 wanted \(0-2, .*\); \d+ decisions, last \[idle\]", out.stdout)

    # `cluster serve` printed every decision with its reason, as it came.
    _wait(lambda: "[idle]" in log_path.read_text(), "the idle decision's line", timeout_s=10)
    log = log_path.read_text()
    assert re.search(r"autoscaler: 0 -> 1 replica\(s\) \[cold-start\] a request arrived", log), log[-3000:]
    assert re.search(r"autoscaler: \d -> 2 replica\(s\) \[queue\] [\d.]+ requests waiting", log), log[-3000:]
    assert re.search(r"autoscaler: \d -> 0 replica\(s\) \[idle\] no request running or waiting", log)
