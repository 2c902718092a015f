"""`llmscale simulate`, `llmscale plan` and `llmscale profile --calibrate` as a user runs them:
what they write, and their one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmscale.bench.metrics import RequestResult
from llmscale.bench.roofline import Chunk
from llmscale.plan.hardware import load_catalogue
from llmscale.plan.step_model import curve_terms

# A pipe as a script sees it (see test_cli.py).
PIPE_ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
PNGS = ("latency_vs_rate.png", "throughput_vs_rate.png", "ttft_cdf.png")
PLAN_ARGS = ["plan", "--model", "llama-3.1-8b", "--hardware-name", "h100-sxm,l4", "--formats", "fp8,bf16",
             "--rate", "2", "--prompt-len", "fixed:256", "--output-len", "fixed:64"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmscale.cli", *args], input="", text=True,
                          capture_output=True, timeout=300, env=PIPE_ENV)


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """The message of a command that failed as a user error: exit code 2, one line, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("llmscale: error:")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_simulate_without_a_machine_to_simulate() -> None:
    msg = one_line_error(run_cli("simulate", "--model", "llama-3.1-8b", "--num-prompts", "5"))
    assert "--calibration FILE" in msg and "llmscale profile --calibrate" in msg, msg


def test_simulate_unknown_hardware_lists_known_names() -> None:
    msg = one_line_error(run_cli("simulate", "--model", "llama-3.1-8b", "--hardware-name", "nope"))
    assert "'nope'" in msg
    assert all(name in msg for name in load_catalogue()), msg


@pytest.mark.parametrize("text", [
    "not json {",
    "[1, 2]",
    '{"version": 1, "model": "x"}',
    '{"version": 1, "coefficients": [1, 2]}',
    '{"version": 1, "coefficients": {"step_s": "fast"}}',
])
def test_simulate_bad_calibration_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "calib.json"
    path.write_text(text)
    msg = one_line_error(run_cli("simulate", "--model", "llama-3.1-8b", "--calibration", str(path),
                                 "--num-prompts", "5", "--out", str(tmp_path / "out")))
    assert f"--calibration {path}" in msg, msg
    assert not (tmp_path / "out").exists()


def test_simulate_catalogue_hardware_writes_bench_results(tmp_path: Path) -> None:
    out_dir = tmp_path / "sim"
    out = run_cli("simulate", "--model", "llama-3.1-8b", "--hardware-name", "h100-sxm", "--num-prompts", "20",
                  "--request-rate", "4", "--prompt-len", "fixed:256", "--output-len", "fixed:32",
                  "--out", str(out_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "simulated h100-sxm" in out.stdout
    doc = json.loads((out_dir / "results.json").read_text())
    assert {"config", "runs"} <= doc.keys()
    assert doc["config"]["hardware_name"] == "h100-sxm"
    assert doc["simulated"]["deployment"].startswith("1 x h100-sxm bf16 TP1")
    (run,) = doc["runs"]
    assert run["request_rate"] == 4
    summary = run["summary"]
    for key in ("ttft_ms", "tpot_ms"):
        assert {"mean", "p50", "p99"} <= summary[key].keys()
        assert 0 < summary[key]["p50"] <= summary[key]["p99"]
    assert summary["output_throughput"] > 0 and summary["completed"] == 20 and summary["failed"] == 0
    record_keys = RequestResult(0, 1, 1, 0.0).to_json().keys()  # what `bench serve` writes per request
    assert len(run["requests"]) == 20
    for r in run["requests"]:
        assert r.keys() == record_keys
        assert r["success"] and r["output_tokens"] == 32 and r["prompt_tokens"] == 256
        assert len(r["itl_s"]) == 31 and 0 < r["ttft_s"] < r["e2e_s"]
    for png in PNGS:
        assert (out_dir / png).stat().st_size > 0


def test_plan_recommends_and_writes_its_files(tmp_path: Path) -> None:
    out_dir = tmp_path / "plan"
    out = run_cli(*PLAN_ARGS, "--slo", "ttft_p99_ms=1000,tpot_p99_ms=100", "--num-prompts", "60",
                  "--out", str(out_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^recommended: 1 x (l4|h100-sxm) ", out.stdout, re.M), out.stdout
    assert "why: " in out.stdout
    doc = json.loads((out_dir / "plan.json").read_text())
    best, frontier = doc["recommended"], doc["frontier"]
    assert best["hardware"] in ("h100-sxm", "l4") and best["weight_format"] in ("fp8", "bf16")
    assert best["ttft_p99_ms"] <= 1000 and best["tpot_p99_ms"] <= 100
    assert best["replicas"] * best["goodput_per_replica"] >= 2
    assert doc["why"] and frontier
    # Cheapest first, and a cheapest configuration no other one beats on every axis.
    assert best["cost_per_hour"] == min(e["cost_per_hour"] for e in doc["evaluated"])
    assert best["configuration"] in [e["configuration"] for e in frontier]
    assert {e["hardware"] for e in doc["evaluated"]} <= {"h100-sxm", "l4"}
    assert {e["weight_format"] for e in doc["evaluated"]} <= {"fp8", "bf16"}
    assert (out_dir / "frontier.png").stat().st_size > 0


def test_plan_impossible_slo_names_the_lowest_tpot(tmp_path: Path) -> None:
    msg = one_line_error(run_cli(*PLAN_ARGS, "--slo", "ttft_p99_ms=1000,tpot_p99_ms=0.01", "--num-prompts",
                                 "20", "--out", str(tmp_path / "plan")))
    lowest = re.search(r"lowest p99 TPOT ([\d.]+) ms", msg)
    assert lowest and float(lowest.group(1)) > 0.01, msg
    assert "relax --slo to at least" in msg
    assert not (tmp_path / "plan").exists()


def test_plan_budget_too_small(tmp_path: Path) -> None:
    msg = one_line_error(run_cli(*PLAN_ARGS, "--slo", "ttft_p99_ms=1000,tpot_p99_ms=100", "--num-prompts",
                                 "20", "--budget-per-hour", "0.01", "--out", str(tmp_path / "plan")))
    cost = re.search(r"costs \$([\d.]+)/hour", msg)
    assert cost and float(cost.group(1)) > 0.01, msg
    assert "--budget-per-hour to at least" in msg


def test_plan_this_machine_needs_a_calibration(tmp_path: Path) -> None:
    msg = one_line_error(run_cli("plan", "--model", "llama-3.1-8b", "--hardware-name", "this-machine",
                                 "--slo", "ttft_p99_ms=1000", "--rate", "2", "--out", str(tmp_path / "p")))
    assert "--calibration FILE" in msg and "llmscale profile --calibrate" in msg, msg


def test_calibrate_then_simulate_this_machine(tiny_model, tmp_path: Path) -> None:
    """`profile --calibrate` measures the engine's steps and a real `llmscale serve`; `simulate`
    then predicts the same model on this machine from that file, with its measured curve."""
    folder = str(tiny_model("llama"))
    calib = tmp_path / "calib.json"
    out = run_cli("profile", "--calibrate", "--model", folder, "--dtype", "float32", "--repeats", "1",
                  "--out", str(calib))
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(calib.read_text())
    assert doc["model"] == folder and doc["weight_format"] == "fp32"
    knots = doc["curve_knots"]
    assert len(knots) >= 2 and knots == sorted(set(knots))
    assert len(doc["curve_coefficients"]) == len(curve_terms([Chunk(0, 2, True)], knots))
    assert set(doc["serving"]) == {"step_s", "per_token_s", "first_token_s", "finished_s", "request_s",
                                   "busy_request_s"}
    assert set(doc["first_run"]) == {"step_s", "per_token_s"} and min(doc["first_run"].values()) >= 0
    assert all(v >= 0 for v in doc["serving"].values())
    assert doc["serving"]["busy_request_s"] >= doc["serving"]["request_s"]
    errors = [s["curve_error"] for s in doc["samples"]]
    assert len(errors) >= 6 and all(isinstance(e, float) for e in errors)
    assert doc["curve_max_abs_error"] == pytest.approx(max(abs(e) for e in errors))
    assert 0 <= doc["curve_mean_abs_error"] <= doc["curve_max_abs_error"]
    assert "measured curve |error| mean" in out.stdout
    assert calib.with_suffix(".png").stat().st_size > 0

    out_dir = tmp_path / "sim"
    out = run_cli("simulate", "--calibration", str(calib), "--model", folder, "--dtype", "float32",
                  "--num-prompts", "10", "--request-rate", "2", "--prompt-len", "fixed:32", "--output-len",
                  "fixed:8", "--max-model-len", "256", "--out", str(out_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "note: the calibration measured" not in out.stderr  # the same model: its measured curve
    result = json.loads((out_dir / "results.json").read_text())
    assert result["simulated"]["deployment"].startswith("1 x this-machine fp32 TP1")
    assert result["simulated"]["request_overhead_ms"] == pytest.approx(doc["serving"]["request_s"] * 1e3)
    assert result["simulated"]["busy_request_overhead_ms"] == pytest.approx(
        doc["serving"]["busy_request_s"] * 1e3)
    (run,) = result["runs"]
    assert len(run["requests"]) == 10
    for r in run["requests"]:
        assert r["success"] and r["output_tokens"] == 8
        assert r["ttft_s"] >= doc["serving"]["request_s"]
    for png in PNGS:
        assert (out_dir / png).stat().st_size > 0
