"""`llmscale bench serve` end to end against a real `llmscale serve` process: the JSON it writes
has every field, plausible timings, and the token counts the server reported."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmscale.bench.datasets import Codec, WorkloadSpec, make_requests
from llmscale.cli import main
from llmscale.serve.process import stop_server

from .live_server import free_port, start_server

OUTPUT_LEN = 6
SUMMARY_KEYS = {"completed", "failed", "duration_s", "prompt_tokens", "output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput", "ttft_ms", "tpot_ms",
                "itl_ms", "e2e_ms", "slo", "goodput", "slo_attainment"}
REQUEST_KEYS = {"index", "prompt_tokens", "max_tokens", "scheduled_s", "start_s", "ttft_s", "e2e_s", "itl_s",
                "output_tokens", "usage_reported", "success", "error", "tpot_s"}


@pytest.fixture(scope="module")
def url(smollm_folder: Path) -> Iterator[str]:
    url, proc = start_server("--dtype", "float32", "--kv-cache-memory", "256MiB", "--max-model-len", "1024",
                             "--model", str(smollm_folder))
    yield url
    stop_server(proc)


def _bench(url: str, out: Path, folder: Path, *extra: str) -> dict[str, Any]:
    main(["bench", "serve", "--base-url", url, "--tokenizer", str(folder), "--out", str(out),
          "--slo", "ttft_ms=60000,tpot_ms=60000", *extra])
    return json.loads((out / "results.json").read_text())


def test_bench_serve_json_matches_server_usage(url: str, smollm_folder: Path, tmp_path: Path) -> None:
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea,",
               "def fibonacci(n):"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "output_len": OUTPUT_LEN}) + "\n" for p in prompts))
    doc = _bench(url, tmp_path / "out", smollm_folder, "--dataset", "jsonl", str(data), "--num-prompts", "3",
                 "--request-rate", "inf", "--warmup", "1")
    assert doc["model"] == httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    assert doc["config"]["num_prompts"] == 3
    [run] = doc["runs"]
    assert run["request_rate"] == "inf" and run["interrupted"] is None
    s = run["summary"]
    assert set(s) == SUMMARY_KEYS
    assert s["completed"] == 3 and s["failed"] == 0 and s["output_tokens"] == 3 * OUTPUT_LEN
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(s[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
    assert s["ttft_ms"]["p99"] < s["e2e_ms"]["p99"]
    assert s["goodput"] == pytest.approx(s["request_throughput"]) and s["slo_attainment"] == 1.0
    assert s["output_throughput"] == pytest.approx(3 * OUTPUT_LEN / s["duration_s"])

    workload = make_requests(WorkloadSpec("jsonl", data), Codec.load(smollm_folder), 3, seed=0)
    for r in run["requests"]:
        assert set(r) == REQUEST_KEYS
        assert r["success"] and r["error"] is None and r["usage_reported"]
        assert 0 < r["ttft_s"] < r["e2e_s"]
        assert r["output_tokens"] == r["max_tokens"] == OUTPUT_LEN
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / (OUTPUT_LEN - 1))
        assert 1 <= len(r["itl_s"]) <= OUTPUT_LEN - 1 and all(x >= 0 for x in r["itl_s"])
        # The same request, not streamed: the server's own usage agrees with the JSON.
        body = {"prompt": workload[r["index"]].text, "max_tokens": OUTPUT_LEN, "temperature": 0,
                "ignore_eos": True}
        usage = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["usage"]
        assert usage["prompt_tokens"] == r["prompt_tokens"]
        assert usage["completion_tokens"] == r["output_tokens"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "latency_vs_rate.png", "throughput_vs_rate.png", "ttft_cdf.png"]


def test_bench_serve_chat_with_concurrency_cap(url: str, smollm_folder: Path, tmp_path: Path) -> None:
    doc = _bench(url, tmp_path, smollm_folder, "--endpoint", "chat", "--num-prompts", "2", "--prompt-len",
                 "24", "--output-len", "3", "--request-rate", "50", "--max-concurrency", "1", "--warmup", "0")
    [run] = doc["runs"]
    assert run["max_concurrency"] == 1 and run["request_rate"] == 50
    first, second = run["requests"]
    assert first["success"] and second["success"]
    # One slot: the second request goes only once the first has finished.
    assert second["start_s"] >= first["start_s"] + first["e2e_s"] - 1e-3
    # The server counts the chat template's tokens too.
    assert all(r["output_tokens"] == 3 and r["prompt_tokens"] > 24 for r in run["requests"])


def test_bench_serve_unreachable_server_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmscale: error: cannot reach http://127.0.0.1:") and "\n" not in err
