"""The cold path with a fallback model: `llmscale cluster serve --min-replicas 0
--fallback-model ...` on a local Ray cluster. While the main model has no replica ready, the
always-warm fallback answers (and says so) and the main deployment is woken; once a main
replica is ready requests go back to it; after scaling to zero the fallback answers again.
The fallback is a tiny random model with the default model's tokenizer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .test_autoscale import HEADERS, _autoscaler, _complete, _wait, autoscaled_cluster
from .test_server import MODEL

FLAGS = ["--min-replicas", "0", "--max-replicas", "1", "--scale-to-zero-after-s", "2",
         "--downscale-delay-s", "1", "--upscale-delay-s", "0"]


def _fallback_ready(url: str) -> bool:
    replicas = httpx.get(f"{url}/cluster/status", headers=HEADERS, timeout=10).json()["replicas"]
    return any(r["replica_id"] == "fallback" and r["state"] == "ready" for r in replicas)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> Iterator[tuple[str, str]]:
    fallback = str(tiny_model("llama"))
    with autoscaled_cluster(tmp_path_factory, *FLAGS, "--fallback-model", fallback) as (url, _):
        _wait(lambda: _fallback_ready(url), "the fallback replica")
        yield url, fallback


def test_the_fallback_answers_while_the_main_model_starts_then_hands_back(cluster: tuple[str, str]) -> None:
    url, fallback = cluster
    assert _autoscaler(url)["ready_replicas"] == 0
    start = time.monotonic()
    first = _complete(url, 0, 4)
    answered_s = time.monotonic() - start
    assert first.status_code == 200, first.text
    assert first.headers["x-llmscale-replica"] == "fallback"
    assert first.json()["model"] == fallback

    # The fallback's answer woke the main deployment; its replica is ready some time later.
    _wait(lambda: _autoscaler(url)["ready_replicas"] == 1, "the main replica")
    cold_start_s = time.monotonic() - start
    assert answered_s < cold_start_s / 2, (answered_s, cold_start_s)

    def served_by_main() -> bool:
        answer = _complete(url, 1, 4)
        return answer.headers["x-llmscale-replica"] == "replica-0" and answer.json()["model"] == MODEL

    _wait(served_by_main, "a request served by the main model", timeout_s=10)

    # Idle: the main deployment scales to zero, and once the ingress has seen it (its /metrics
    # show the board's snapshot it routes by), the fallback answers again.
    _wait(lambda: _autoscaler(url)["ready_replicas"] == 0, "scale to zero", timeout_s=60)
    _wait(lambda: re.search(r"llmscale:autoscaler_ready_replicas\{.*\} 0\.0",
                            httpx.get(f"{url}/metrics", timeout=10).text), "the ingress seeing zero", 10)
    assert _complete(url, 2, 4).headers["x-llmscale-replica"] == "fallback"


def test_metrics_and_status_show_the_fallback_replica(cluster: tuple[str, str]) -> None:
    url, _ = cluster
    assert 'replica="fallback"' in httpx.get(f"{url}/metrics", timeout=10).text
    replicas = httpx.get(f"{url}/cluster/status", headers=HEADERS, timeout=10).json()["replicas"]
    assert [r["role"] for r in replicas if r["replica_id"] == "fallback"] == ["fallback"]
