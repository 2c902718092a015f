"""`llmscale cluster serve` as a user runs it: a local Ray cluster, two engine replicas of the
default model behind one OpenAI endpoint, the prefix router. One cluster for the module: Ray
and two engines take tens of seconds to start.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmscale.ray_cluster import is_loopback

from .live_server import free_port
from .test_cli import run_cli
from .test_ray_cluster import _children, _listeners
from .test_server import (
    API_KEY,
    BAD_INPUTS,
    MAX_BODY_BYTES,
    MAX_MODEL_LEN,
    MAX_N,
    MODEL,
    assert_openai_error,
)

REPLICAS = {"replica-0", "replica-1"}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _status(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/cluster/status", headers=HEADERS, timeout=10).json()["replicas"]


def _wait(ok: Any, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _ready(url: str) -> bool:
    try:
        return {r["replica_id"] for r in _status(url) if r["state"] == "ready"} == REPLICAS
    except (httpx.HTTPError, KeyError, ValueError):
        return False


@contextmanager
def cluster_serve_process(tmp_path_factory: pytest.TempPathFactory, flags: list[str], ready: Any,
                          what: str) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`llmscale cluster serve --replica-cpus 1` with the default model in fp32 and `flags` on a
    free loopback port; yields (url, process, its stderr log) once `ready(url)`, SIGTERMs it after."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("cluster") / "stderr.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmscale.cli", "cluster", "serve", "--replica-cpus", "1", "--port", str(port),
         "--api-key", API_KEY, "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
         "--drain-timeout", "10", *flags],
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: proc.poll() is not None or ready(url), what)
        assert proc.poll() is None, f"cluster serve exited during start-up: {log_path.read_text()[-3000:]}"
        yield url, proc, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        log.close()


@contextmanager
def _cluster_serve(tmp_path_factory: pytest.TempPathFactory, *flags: str
                   ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Two replicas of the default model with the server suite's limits and `flags`; yields
    once both replicas are ready."""
    suite = ["--num-replicas", "2", "--max-n", str(MAX_N), "--max-body-bytes", str(MAX_BODY_BYTES),
             "--kv-cache-memory", "128MiB", "-v", *flags]
    with cluster_serve_process(tmp_path_factory, suite, _ready, "two ready replicas") as (url, proc, _):
        yield url, proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with _cluster_serve(tmp_path_factory) as started:
        yield started


@pytest.fixture(scope="module")
def url(cluster: tuple[str, subprocess.Popen[bytes]]) -> str:
    return cluster[0]


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def test_answers_name_the_replica_streamed_or_not(url: str, client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="The capital of France is",
                                                      max_tokens=8, temperature=0)
    assert raw.headers["x-llmscale-replica"] in REPLICAS
    assert raw.parse().usage.completion_tokens == 8
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=HEADERS, timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        assert r.headers["x-llmscale-replica"] in REPLICAS
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_status_shows_every_replica(url: str) -> None:
    replicas = _status(url)
    assert {r["replica_id"] for r in replicas} == REPLICAS
    assert len({r["pid"] for r in replicas}) == 2
    for r in replicas:
        assert r["state"] == "ready" and r["node"] and 0 <= r["kv_usage"] <= 1
    out = run_cli("cluster", "status", "--url", url, "--api-key", API_KEY)
    assert out.returncode == 0, out.stderr
    for r in replicas:
        assert re.search(rf"{r['replica_id']}\s.*ready.*\s{r['pid']}\s", out.stdout), out.stdout


def test_prefix_router_keeps_a_shared_prompt_on_one_replica(client: openai.OpenAI) -> None:
    """Requests sharing a long system prompt go where its blocks are cached; requests with
    distinct prompts still use both replicas."""
    served: dict[str, Counter[str]] = {}
    for system in ("You are a pirate. " * 20, "You answer in French only. " * 20):
        served[system] = Counter()
        for i in range(6):
            raw = client.completions.with_raw_response.create(
                model=MODEL, prompt=f"{system}Question {i}: what is {i} + {i}?", max_tokens=2)
            served[system][raw.headers["x-llmscale-replica"]] += 1
    for counts in served.values():
        assert max(counts.values()) >= 5, served
    spread = Counter()
    for i in range(8):
        words = " ".join(str(j * i) for j in range(40))
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=f"{i} unrelated: {words}",
                                                          max_tokens=2)
        spread[raw.headers["x-llmscale-replica"]] += 1
    assert set(spread) == REPLICAS, spread


SYSTEMS = [f"You are assistant number {k}. " + "Answer briefly and politely, in plain words. " * 8
           for k in range(3)]


def _send_workload(url: str, prompts: list[str], concurrency: int, max_tokens: int = 4
                   ) -> list[tuple[str, int]]:
    """(replica, cached prompt tokens) of each request, sent `concurrency` at a time."""
    def one(prompt: str) -> tuple[str, int]:
        r = httpx.post(f"{url}/v1/completions", headers=HEADERS, timeout=180,
                       json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.headers["x-llmscale-replica"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def _affinity(prompts: list[str], served: list[tuple[str, int]]) -> float:
    """Mean over system prompts of the share of their requests on their most used replica."""
    shares = []
    for system in SYSTEMS:
        replicas = Counter(rep for p, (rep, _) in zip(prompts, served, strict=True) if p.startswith(system))
        shares.append(max(replicas.values()) / sum(replicas.values()))
    return sum(shares) / len(shares)


def test_prefix_router_beats_round_robin_on_shared_system_prompts(
        url: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same workload on this cluster and on one under the round-robin router (a second
    Ray cluster, stopped after): the prefix router keeps each system prompt on one replica and
    so serves more prompt tokens from the prefix cache."""
    prompts = [f"{SYSTEMS[i % 3]}Question {i}: name a colour." for i in range(18)]
    by_router = {"prefix": _send_workload(url, prompts, concurrency=2)}
    with _cluster_serve(tmp_path_factory, "--router", "round-robin") as (round_robin_url, _):
        by_router["round-robin"] = _send_workload(round_robin_url, prompts, concurrency=2)
    affinity = {name: _affinity(prompts, served) for name, served in by_router.items()}
    cached = {name: sum(c for _, c in served) for name, served in by_router.items()}
    assert affinity["prefix"] >= 0.8 and affinity["prefix"] > affinity["round-robin"], affinity
    assert cached["prefix"] > cached["round-robin"], cached


def test_one_hot_prefix_still_spreads_over_both_replicas(url: str) -> None:
    """The load guard: with every request on one system prompt and several in flight, no
    replica takes more than three quarters of them."""
    prompts = [f"{SYSTEMS[0]}Request {i}: count to five." for i in range(24)]
    served = Counter(rep for rep, _ in _send_workload(url, prompts, concurrency=6, max_tokens=24))
    assert max(served.values()) <= 0.75 * len(prompts), served


def test_metrics_label_each_replica(url: str) -> None:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for replica in REPLICAS:
        assert re.search(rf'llmscale:num_requests_running\{{.*replica="{replica}".*\}} ', text), text
    assert "llmscale:generation_tokens_total" in text


@pytest.mark.parametrize("name,path,body,status,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_the_same_error_as_one_server(url: str, name: str, path: str, body: Any, status: int,
                                                     needle: str) -> None:
    assert_openai_error(url, name, path, body, status, needle)


def _plain(url: str, i: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers=HEADERS, timeout=180, json={
        "prompt": f"Story {i}: once upon a time", "max_tokens": 48, "ignore_eos": True})


def _streamed(url: str, i: int) -> list[str]:
    with httpx.stream("POST", f"{url}/v1/completions", headers=HEADERS, timeout=180, json={
            "prompt": f"Tale {i}: long ago", "max_tokens": 48, "ignore_eos": True, "stream": True}) as r:
        return [line for line in r.iter_lines() if line]


def test_a_killed_replica_loses_no_request_and_is_replaced(url: str) -> None:
    """SIGKILL a replica with requests in flight: plain requests all complete (run again
    elsewhere), streams complete or end with an error event, and Serve starts a replacement
    under the same id."""
    busy: list[dict[str, Any]] = []

    def some_replica_busy() -> bool:
        busy[:] = [r for r in _status(url) if r["state"] == "ready" and r["running"] >= 2]
        return bool(busy)

    with ThreadPoolExecutor(10) as pool:
        plain = [pool.submit(_plain, url, i) for i in range(8)]
        streams = [pool.submit(_streamed, url, i) for i in range(2)]
        _wait(some_replica_busy, "a replica running requests", 60)
        victim = busy[0]
        os.kill(victim["pid"], signal.SIGKILL)
        for f in plain:
            r = f.result(timeout=180)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 48
        for f in streams:
            lines = f.result(timeout=180)
            assert lines[-1] == "data: [DONE]" or '"error"' in lines[-1], lines[-3:]

    def replaced() -> bool:
        now = {r["replica_id"]: r for r in _status(url)}[victim["replica_id"]]
        return now["state"] == "ready" and now["pid"] != victim["pid"]

    _wait(replaced, f"a replacement for {victim['replica_id']}", 180)
    assert _plain(url, 99).status_code == 200


def test_cluster_listens_on_loopback_and_sigterm_drains_then_stops_it(
        cluster: tuple[str, subprocess.Popen[bytes]]) -> None:
    """Last in the module: it stops the cluster. Every listener of every process the command
    started is on loopback; SIGTERM lets a stream in flight finish, then nothing is left."""
    url, proc = cluster
    tree = _descendants(proc.pid)
    listening = {(x.host, x.port, x.pid) for x in _listeners() if x.pid in tree}
    assert len({pid for _, _, pid in listening}) >= 4  # the command, GCS, raylet, replicas, ...
    assert all(is_loopback(host) for host, _, _ in listening), listening
    with httpx.stream("POST", f"{url}/v1/completions", headers=HEADERS, timeout=120, json={
            "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert proc.wait(timeout=120) == 0
    left = {(x.host, x.port, x.pid) for x in _listeners() if x.pid in tree}
    assert not left, left


def _descendants(root: int) -> set[int]:
    children = _children()
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found
