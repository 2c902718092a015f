"""`llmscale cluster coldstart` as a user runs it, on a local Ray cluster: one cold start of the
default model timed phase by phase, written as a table, JSON and a PNG; and the phase
arithmetic on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmscale.cluster.coldstart import PHASES, breakdown, evict_page_cache

from .live_server import free_port
from .test_cli import run_cli


def test_phases_add_up_to_the_wait_for_the_first_token() -> None:
    startup = {"process_start_s": 101.0, "init_start_s": 103.5, "ready_s": 106.0,
               "engine_phases": {"checkpoint": 0.2, "kernels": 0.1, "weights": 1.0, "prepack": 0.0,
                                 "kv_cache": 0.4, "other": 0.01}}
    phases = breakdown(sent_s=100.0, first_token_s=106.75, startup=startup)
    assert list(phases) == list(PHASES)
    assert phases["ray"] == pytest.approx(1.0) and phases["imports"] == pytest.approx(2.5)
    assert phases["replica"] == pytest.approx(2.5 - 1.7)
    assert phases["first token"] == pytest.approx(0.75)
    assert sum(phases.values()) == pytest.approx(6.75)


def test_coldstart_times_a_replica_from_zero(tmp_path: Path) -> None:
    """With the checkpoint out of the page cache and the layers streamed in: both mitigations'
    paths through a real replica."""
    out = run_cli("cluster", "coldstart", "--repeats", "1", "--port", str(free_port()), "--dtype", "float32",
                  "--kv-cache-memory", "64MiB", "--max-model-len", "512", "--out", str(tmp_path),
                  "--evict-page-cache", "--stream-weights")
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "coldstart.json").read_text())
    (run,) = doc["runs"]
    assert set(run) == set(PHASES)
    assert all(seconds >= 0 for seconds in run.values()), run
    assert run["weights"] > 0 and run["imports"] > 0 and run["ray"] > 0
    assert "cold start of SmolLM2-135M-Instruct" in out.stdout and "first token" in out.stdout
    assert (tmp_path / "coldstart.png").stat().st_size > 0


def test_evicting_the_page_cache_keeps_the_files(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 10_000)
    (tmp_path / "b.bin").write_bytes(b"y" * 5_000)
    assert evict_page_cache(tmp_path) == 15_000
    assert (tmp_path / "a.bin").read_bytes() == b"x" * 10_000
