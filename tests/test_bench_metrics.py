"""Benchmark math against hand-computed cases: percentiles, TPOT, goodput, the arrival process,
length distributions and workload loading errors."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from llmscale.bench.arrivals import arrival_times, parse_rates
from llmscale.bench.datasets import BenchRequest, Codec, WorkloadSpec, make_requests
from llmscale.bench.lengths import LengthDist, parse_length
from llmscale.bench.metrics import (
    RequestResult,
    Run,
    max_rate_meeting_slo,
    parse_slo,
    percentile,
    summarize,
)
from llmscale.bench.report import plot, write_json
from llmscale.config import ConfigError


def result(ttft: float, e2e: float, out: int, prompt: int = 10, ok: bool = True) -> RequestResult:
    return RequestResult(0, prompt, out, 0.0, ttft_s=ttft, e2e_s=e2e, output_tokens=out, success=ok,
                         itl_s=[(e2e - ttft) / (out - 1)] * (out - 1) if out > 1 else [])


def test_percentile_interpolates_like_numpy() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(xs, 50) == 2.5  # halfway between ranks 1 and 2
    assert percentile(xs, 90) == pytest.approx(3.7)  # rank 2.7
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_tpot_and_one_token_outputs() -> None:
    assert result(0.5, 2.5, 5).tpot_s == pytest.approx(0.5)  # (2.5 - 0.5) / (5 - 1)
    assert result(0.5, 0.5, 1).tpot_s is None  # one token: no time per output token
    assert result(0.5, 2.5, 5, ok=False).tpot_s is None
    run = Run("x", 1.0, 1.0, None, 0, 10.0, [result(0.5, 2.5, 5), result(1.0, 1.0, 1)])
    s = summarize(run)
    assert s["tpot_ms"]["mean"] == pytest.approx(500.0)  # the 1-token request adds no TPOT sample
    assert s["ttft_ms"]["p50"] == pytest.approx(750.0)
    assert s["itl_ms"]["p99"] == pytest.approx(500.0)
    assert s["output_tokens"] == 6 and s["prompt_tokens"] == 20
    assert s["request_throughput"] == pytest.approx(0.2)
    assert s["output_throughput"] == pytest.approx(0.6)
    assert s["total_token_throughput"] == pytest.approx(2.6)


def test_goodput_counts_requests_within_every_slo() -> None:
    reqs = [
        result(0.5, 2.5, 5),  # TTFT 500 ms, TPOT 500 ms
        result(0.1, 0.5, 5),  # TTFT 100 ms, TPOT 100 ms: the only one within both
        result(3.0, 3.4, 5),  # TTFT too slow
        result(0.2, 0.2, 1),  # no TPOT: meets the TPOT SLO vacuously
        result(0.1, 0.5, 5, ok=False),  # failed: never good
    ]
    run = Run("x", 2.0, 1.0, None, 0, 4.0, reqs)
    s = summarize(run, parse_slo("ttft_ms=1000,tpot_ms=200"))
    assert s["goodput"] == pytest.approx(2 / 4.0)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["completed"] == 4 and s["failed"] == 1
    assert summarize(run, {"e2e_ms": 600})["goodput"] == pytest.approx(2 / 4.0)
    slow = Run("x", 4.0, 1.0, None, 0, 4.0, [result(3.0, 3.4, 5)])
    fast = Run("x", 1.0, 1.0, None, 0, 4.0, [result(0.1, 0.5, 5)])
    assert max_rate_meeting_slo([fast, slow], {"ttft_ms": 1000}, 0.9) == 1.0
    assert max_rate_meeting_slo([slow], {"ttft_ms": 1000}, 0.9) is None


@pytest.mark.parametrize("bad", ["ttft=100", "ttft_ms", "ttft_ms=-1", "tpot_ms=abc", "itl_ms=5"])
def test_slo_errors_are_one_line(bad: str) -> None:
    with pytest.raises(ConfigError, match="--slo"):
        parse_slo(bad)


def test_poisson_mean_rate_and_burstiness_variance() -> None:
    n, rate = 4000, 5.0
    times = arrival_times(n, rate, 1.0, seed=0)
    assert times[0] == 0.0 and times == sorted(times)
    assert (n - 1) / times[-1] == pytest.approx(rate, rel=0.05)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # Exponential gaps: variance 1/rate^2. Gamma(shape k): 1/(k rate^2), mean unchanged.
    assert statistics.variance(gaps) == pytest.approx(1 / rate ** 2, rel=0.15)
    bursty = arrival_times(n, rate, 0.25, seed=0)
    even = arrival_times(n, rate, 4.0, seed=0)
    for ts in (bursty, even):
        assert (n - 1) / ts[-1] == pytest.approx(rate, rel=0.1)
    var = {k: statistics.variance([b - a for a, b in zip(ts, ts[1:], strict=False)])
           for k, ts in (("bursty", bursty), ("even", even))}
    assert var["bursty"] > 3 * statistics.variance(gaps) > 9 * var["even"]
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]
    assert arrival_times(50, 2.0, seed=7) == arrival_times(50, 2.0, seed=7)
    with pytest.raises(ConfigError):
        arrival_times(3, 0.0)
    assert parse_rates("0.5, 1,inf") == [0.5, 1.0, math.inf]
    with pytest.raises(ConfigError, match="--sweep-rates"):
        parse_rates("1,fast")


def test_length_distributions() -> None:
    assert parse_length("256", "--x") == LengthDist("fixed", 256)
    rng = random.Random(0)
    assert {parse_length("uniform:3,5", "--x").sample(rng) for _ in range(200)} == {3, 4, 5}
    normal = [parse_length("normal:200,20", "--x").sample(rng) for _ in range(4000)]
    assert statistics.mean(normal) == pytest.approx(200, rel=0.02)
    logn = [parse_length("lognormal:200,1.0", "--x").sample(rng) for _ in range(20000)]
    assert statistics.mean(logn) == pytest.approx(200, rel=0.08)  # parameterised by its mean
    assert statistics.median(logn) < 150  # the long right tail: median e^mu = 200 e^-0.5 ~ 121
    for bad in ("gauss:1,2", "uniform:9,3", "fixed:0", "normal:5", "fixed:x"):
        with pytest.raises(ConfigError, match="--prompt-len"):
            parse_length(bad, "--prompt-len")


@pytest.fixture(scope="module")
def codec(smollm_folder: Path) -> Codec:
    return Codec.load(smollm_folder)


def test_synthetic_and_prefix_share_workloads(codec: Codec) -> None:
    spec = WorkloadSpec(prompt_len=LengthDist("fixed", 40), output_len=LengthDist("uniform", 4, 8))
    reqs = make_requests(spec, codec, 6, seed=3)
    assert reqs == make_requests(spec, codec, 6, seed=3)  # seeded
    assert reqs != make_requests(spec, codec, 6, seed=4)
    assert all(r.prompt_len == 40 and 4 <= r.output_len <= 8 and not r.prefix for r in reqs)
    # Cut from the corpus by token ids: re-encoding the text gives about as many tokens.
    assert all(abs(len(codec.encode(r.text)) - 40) <= 3 for r in reqs)
    share = WorkloadSpec("prefix-share", prompt_len=LengthDist("fixed", 20),
                         output_len=LengthDist("fixed", 4), num_prefixes=2, prefix_len=100)
    reqs = make_requests(share, codec, 12, seed=0)
    assert len({r.prefix for r in reqs}) == 2
    assert all(r.prompt_len == 120 and r.text.startswith(r.prefix) for r in reqs)
    capped = WorkloadSpec(prompt_len=LengthDist("fixed", 500), output_len=LengthDist("fixed", 30),
                          max_total_len=100)
    assert all(r.prompt_len + r.output_len == 100 for r in make_requests(capped, codec, 3, seed=0))


def test_jsonl_workload_and_errors_name_the_line(tmp_path: Path, codec: Codec) -> None:
    good = tmp_path / "ok.jsonl"
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello, how are you?"}]
    chat = {"conversations": turns}
    good.write_text(json.dumps({"prompt": "Hello there", "output_len": 7}) + "\n\n" + json.dumps(chat))
    spec = WorkloadSpec("jsonl", good)
    reqs = make_requests(spec, codec, 5, seed=0)
    assert len(reqs) == 5
    by_prompt = {r.prompt: r for r in reqs}
    assert by_prompt["Hello there"].output_len == 7
    assert by_prompt["Hi"].output_len == len(codec.encode("Hello, how are you?"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "output_len": 3}\n{"prompt": "b",, }\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: not valid JSON"):
        make_requests(WorkloadSpec("jsonl", bad), codec, 2, seed=0)
    for line, why in (('["a"]', "expected a JSON object"), ('{"text": "a"}', "expected"),
                      ('{"prompt": "a", "output_len": 0}', '"output_len" must be'),
                      ('{"conversations": [{"from": "gpt", "value": "x"}]}', "the conversation has no")):
        bad.write_text('{"prompt": "fine"}\n' * 2 + line + "\n")
        with pytest.raises(ConfigError, match=rf"bad\.jsonl:3: {why}"):
            make_requests(WorkloadSpec("jsonl", bad), codec, 1, seed=0)
    with pytest.raises(ConfigError, match="no such file"):
        make_requests(WorkloadSpec("jsonl", tmp_path / "missing.jsonl"), codec, 1, seed=0)


def test_report_writes_strict_json_and_plots(tmp_path: Path) -> None:
    runs = [Run("a", rate, 1.0, None, 0, 2.0, [result(0.1 * rate, 1.0, 4), result(0.2, 0.2, 1)])
            for rate in (1.0, math.inf)]
    runs.append(Run("b", 1.0, 1.0, 2, 0, 0.0, []))  # nothing measured: NaN statistics
    slo = {"ttft_ms": 150.0}
    write_json(tmp_path / "r.json", {"k": 1}, runs, slo)
    doc = json.loads((tmp_path / "r.json").read_text())  # strict: no NaN or Infinity tokens
    assert doc["runs"][1]["request_rate"] == "inf"
    assert doc["runs"][2]["summary"]["ttft_ms"]["mean"] is None
    first = doc["runs"][0]["requests"][0]
    assert first["tpot_s"] == pytest.approx(0.3) and len(first["itl_s"]) == 3
    paths = plot(runs, tmp_path, slo, "test")
    assert [p.name for p in paths] == ["latency_vs_rate.png", "throughput_vs_rate.png", "ttft_cdf.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_bench_request_text() -> None:
    assert BenchRequest("q", 3, 1, "sys\n\n").text == "sys\n\nq"
