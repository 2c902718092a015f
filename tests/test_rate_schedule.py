"""Time-varying request rates (`--rate-schedule`): parsing each form and its errors, the
time-rescaled gamma arrivals, the load plan's single run, the CLI's conflicts, and one
`llmscale bench offline` run on a tiny model that follows a schedule into the JSON and plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscale.bench.arrivals import RateSchedule, arrival_times, parse_rate_schedule
from llmscale.bench.load import LoadPlan
from llmscale.bench.metrics import RequestResult, Run
from llmscale.bench.report import plot, run_json
from llmscale.config import ConfigError

BIG = 10 ** 9  # no cap on the number of arrivals


def test_steps_form() -> None:
    s = parse_rate_schedule("steps:1x30, 4x30,1x30")
    assert s.segments == ((30.0, 1.0), (30.0, 4.0), (30.0, 1.0))
    assert s.spec == "steps:1x30, 4x30,1x30"
    assert s.duration_s == 90.0
    assert s.mean_rate == pytest.approx(2.0)  # (30 + 120 + 30) / 90
    assert [s.rate_at(t) for t in (-1, 0, 29.9, 30, 59.9, 60, 89.9, 90)] == [0, 1, 1, 4, 4, 1, 1, 0]
    assert parse_rate_schedule("steps:0.5x2,0x1").mean_rate == pytest.approx(1 / 3)


def test_diurnal_form() -> None:
    s = parse_rate_schedule("diurnal:1,5,600")
    assert s.duration_s == pytest.approx(600.0) and len(s.segments) == 96
    assert all(d == pytest.approx(600 / 96) for d, _ in s.segments)
    assert s.mean_rate == pytest.approx(3.0)  # each step is the sinusoid's mean over it
    assert s.rate_at(0) == pytest.approx(1.0, abs=0.01) and s.rate_at(300) == pytest.approx(5.0, abs=0.01)
    assert s.rate_at(150) == pytest.approx(3.0, abs=0.2) and s.rate_at(599) == pytest.approx(1.0, abs=0.01)
    longer = parse_rate_schedule("diurnal:0,2,100,250")  # two and a half periods
    assert longer.duration_s == pytest.approx(250.0) and len(longer.segments) == 240
    assert longer.rate_at(0) == pytest.approx(0.0, abs=0.01) and longer.rate_at(249) > 1.9
    assert all(r >= 0 for _, r in longer.segments)
    arrivals = s.arrival_times(BIG, seed=1)
    first_quarter = sum(t < 150 for t in arrivals)
    second_quarter = sum(150 <= t < 300 for t in arrivals)
    assert first_quarter < second_quarter  # rising towards the peak


def test_file_form(tmp_path: Path) -> None:
    f = tmp_path / "load.csv"
    f.write_text("# seconds, rate\n0,1\n\n10 4  # a burst\n20, 0.5\n40,0\n")
    s = parse_rate_schedule(str(f))
    assert s.segments == ((10.0, 1.0), (10.0, 4.0), (20.0, 0.5))
    assert s.spec == str(f) and s.duration_s == 40.0
    assert s.mean_rate == pytest.approx((10 + 40 + 10) / 40)


@pytest.mark.parametrize("spec", [
    "", "nothing-here.csv", "ramp:1,2", "steps:", "steps:1x", "steps:x30", "steps:1*30", "steps:1x30,",
    "steps:-1x30", "steps:1x0", "steps:1x-5", "steps:0x30", "steps:infx30", "steps:nanx30", "steps:1xinf",
    "diurnal:1,2", "diurnal:1,2,3,4,5", "diurnal:3,1,60", "diurnal:0,0,60", "diurnal:-1,2,60",
    "diurnal:1,2,0", "diurnal:1,2,60,0", "diurnal:1,2,60,-1", "diurnal:1,2,1,1e9", "diurnal:a,2,60",
])
def test_spec_errors_are_one_line_and_name_the_flag(spec: str) -> None:
    with pytest.raises(ConfigError, match="^--rate-schedule: ") as e:
        parse_rate_schedule(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("text", "why"), [
    ("0,1\n", "at least two lines"),
    ("0,1\n10,2\n", "at least two lines, the last 'END_SECONDS,0'"),
    ("1,1\n10,0\n", r"load\.csv:1: the first line must start at 0"),
    ("0,1\n10,2\n10,0\n", r"load\.csv:3: times must increase"),
    ("0,1\n10,2\n5,0\n", r"load\.csv:3: times must increase"),
    ("0,1\n10\n20,0\n", r"load\.csv:2: expected SECONDS,RATE"),
    ("0,1,2\n20,0\n", r"load\.csv:1: expected SECONDS,RATE"),
    ("seconds,rate\n0,1\n20,0\n", "'seconds' is not a number"),
    ("0,-1\n10,1\n20,0\n", "every rate must be"),
    ("0,0\n10,0\n", "at least one rate must be > 0"),
    ("# nothing\n\n", "at least two lines"),
])
def test_file_errors_are_one_line(tmp_path: Path, text: str, why: str) -> None:
    f = tmp_path / "load.csv"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"^--my-flag: .*{why}") as e:
        parse_rate_schedule(str(f), "--my-flag")
    assert "\n" not in str(e.value)


def test_direct_construction_is_validated() -> None:
    assert RateSchedule([(2, 3)], "x").segments == ((2.0, 3.0),)
    for segments in ([], [(0, 1)], [(1, -1)], [(1, 0)], [(math.inf, 1)]):
        with pytest.raises(ConfigError, match="--rate-schedule"):
            RateSchedule(tuple(segments), "x")


def test_arrival_count_follows_the_integral() -> None:
    s = parse_rate_schedule("steps:2x200,10x100,0x50,5x100")
    expected = 2 * 200 + 10 * 100 + 5 * 100  # 1900
    for seed in range(3):
        arrivals = s.arrival_times(BIG, seed=seed)
        assert len(arrivals) == pytest.approx(expected, rel=0.1)
        assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
        assert all(0 <= t < s.duration_s for t in arrivals)
        assert not [t for t in arrivals if 300 <= t < 350]  # the rate-0 segment
        per_segment = [sum(a <= t < b for t in arrivals) for a, b in ((0, 200), (200, 300), (350, 450))]
        assert per_segment == pytest.approx([400, 1000, 500], rel=0.2)


def test_arrivals_are_capped_deterministic_and_start_at_the_first_positive_rate() -> None:
    s = parse_rate_schedule("steps:0x5,3x20")
    arrivals = s.arrival_times(BIG, seed=4)
    assert arrivals[0] == 5.0 and all(t >= 5 for t in arrivals)
    assert s.arrival_times(7, seed=4) == arrivals[:7]
    assert s.arrival_times(0, seed=4) == []
    assert s.arrival_times(BIG, seed=4) == arrivals
    assert s.arrival_times(BIG, seed=5) != arrivals
    with pytest.raises(ConfigError, match="burstiness"):
        s.arrival_times(10, burstiness=0.0)


def test_one_segment_is_the_fixed_rate_process() -> None:
    # Time rescaling with a constant rate is plain scaling: the same draws as arrival_times.
    s = parse_rate_schedule("steps:3x1000")
    for burstiness in (0.5, 1.0, 4.0):
        fixed = arrival_times(200, 3.0, burstiness, 9)
        assert s.arrival_times(200, burstiness, seed=9) == pytest.approx(fixed)


def _window_counts(arrivals: list[float], width: float, n: int) -> list[int]:
    counts = [0] * n
    for t in arrivals:
        counts[int(t // width)] += 1
    return counts


def test_burstiness_below_one_varies_the_counts_more() -> None:
    s = parse_rate_schedule("steps:5x200,20x200")
    var = {}
    for b in (0.25, 4.0):
        arrivals = s.arrival_times(BIG, b, seed=0)
        counts = _window_counts(arrivals, 2.0, 200)
        # Compare within each rate: count variance of a renewal process ~ expected count / burstiness.
        var[b] = statistics.variance(counts[:100]) + statistics.variance(counts[100:])
        assert len(arrivals) == pytest.approx(5000, rel=0.1)
    assert var[0.25] > 4 * var[4.0]


segments_st = st.lists(st.tuples(st.floats(0.01, 20), st.sampled_from([0.0, 0.3, 1.0, 2.5, 10.0])),
                       min_size=1, max_size=6).filter(lambda segs: any(r > 0 for _, r in segs))


@settings(max_examples=150, deadline=None)
@given(segments=segments_st, max_requests=st.integers(0, 300), burstiness=st.floats(0.1, 10),
       seed=st.integers(0, 2 ** 32))
def test_arrivals_properties(segments: list[tuple[float, float]], max_requests: int, burstiness: float,
                             seed: int) -> None:
    s = RateSchedule(tuple(segments), "prop")
    arrivals = s.arrival_times(max_requests, burstiness, seed)
    assert len(arrivals) <= max_requests
    assert arrivals == sorted(arrivals)
    assert all(0 <= t < s.duration_s for t in arrivals)
    assert all(s.rate_at(t) > 0 for t in arrivals)  # never inside a rate-0 segment
    assert arrivals == s.arrival_times(max_requests, burstiness, seed)


def test_load_plan_run_arrivals_both_modes() -> None:
    fixed = LoadPlan([2.0], 5, burstiness=0.5, seed=3)
    fixed.validate()
    assert fixed.run_arrivals(2.0, 3) == arrival_times(5, 2.0, 0.5, 3)
    assert fixed.rate_schedule is None
    s = parse_rate_schedule("steps:4x10,1x10")
    plan = LoadPlan([s.mean_rate], 1000, burstiness=2.0, rate_schedule=s)
    plan.validate()
    assert plan.run_arrivals(s.mean_rate, 7) == s.arrival_times(1000, 2.0, 7)
    capped = LoadPlan([s.mean_rate], 6, rate_schedule=s)
    assert capped.run_arrivals(s.mean_rate, 7) == s.arrival_times(6, 1.0, 7)
    assert len(capped.run_arrivals(s.mean_rate, 7)) == 6
    with pytest.raises(ConfigError, match="--rate-schedule"):
        LoadPlan([1.0, 2.0], 10, rate_schedule=s).validate()


def _args(*argv: str):
    from llmscale.cli import build_parser

    return build_parser().parse_args(["bench", "serve", *argv])


def test_cli_builds_the_plan_and_rejects_conflicts(capsys: pytest.CaptureFixture[str]) -> None:
    from llmscale.bench.cli import DEFAULT_NUM_PROMPTS, load_plan
    from llmscale.cli import main

    plan = load_plan(_args("--rate-schedule", "steps:1x30,4x30,1x30", "--burstiness", "0.5"))
    assert plan.rate_schedule is not None and plan.rate_schedule.spec == "steps:1x30,4x30,1x30"
    assert plan.rates == [pytest.approx(2.0)] and plan.burstiness == 0.5
    assert plan.num_prompts > 10 ** 6  # the schedule decides the count unless --num-prompts caps it
    assert load_plan(_args("--rate-schedule", "steps:1x30", "--num-prompts", "5")).num_prompts == 5
    assert load_plan(_args()).num_prompts == DEFAULT_NUM_PROMPTS and load_plan(_args()).rate_schedule is None
    for extra in (("--sweep-rates", "1,2"), ("--request-rate", "3")):
        with pytest.raises(ConfigError, match="^--rate-schedule .*--sweep-rates or --request-rate$"):
            load_plan(_args("--rate-schedule", "steps:1x30", *extra))
        with pytest.raises(SystemExit) as exit_info:  # before any server is contacted
            main(["bench", "serve", "--rate-schedule", "steps:1x30", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("llmscale: error: --rate-schedule") and "\n" not in err


def _done(start: float, ttft: float) -> RequestResult:
    return RequestResult(0, 10, 4, start, start_s=start, ttft_s=ttft, e2e_s=ttft + 0.3, output_tokens=4,
                         success=True)


def test_report_records_the_schedule_and_plots_load_over_time(tmp_path: Path) -> None:
    spec = "steps:2x5,6x5"
    reqs = [_done(0.5 * i, 0.05 if i < 10 else 0.4) for i in range(20)]
    run = Run("a", 4.0, 1.0, None, 0, 10.5, reqs, None, parse_rate_schedule(spec))
    doc = run_json(run, {})
    assert doc["rate_schedule"] == {"spec": spec, "segments": [[5.0, 2.0], [5.0, 6.0]]}
    assert "rate_schedule" not in run_json(Run("a", 1.0, 1.0, None, 0, 1.0, reqs), {})
    paths = plot([run], tmp_path, {"ttft_ms": 100.0}, "test")
    assert [p.name for p in paths] == ["latency_vs_rate.png", "throughput_vs_rate.png", "ttft_cdf.png",
                                       "load_over_time.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    # Stopped early: the windows it never reached are left out, not drawn as zero throughput.
    stopped = Run("a", 4.0, 1.0, None, 0, 2.0, reqs[:4], "interrupted (Ctrl-C)", parse_rate_schedule(spec))
    assert plot([stopped], tmp_path / "stopped", {}, "test")[-1].name == "load_over_time.png"


def test_bench_offline_follows_a_schedule(tiny_model, tmp_path: Path) -> None:
    from llmscale.cli import main

    spec = "steps:16x0.5,0x0.4,16x0.5"
    out = tmp_path / "out"
    main(["bench", "offline", "--model", str(tiny_model("llama")), "--dtype", "float32", "--kv-cache-memory",
          "16MiB", "--max-model-len", "128", "--prompt-len", "8", "--output-len", "2", "--warmup", "1",
          "--rate-schedule", spec, "--seed", "2", "--out", str(out)])
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["rate_schedule"] == spec
    [run] = doc["runs"]
    schedule = parse_rate_schedule(spec)
    assert run["request_rate"] == pytest.approx(schedule.mean_rate)
    assert run["rate_schedule"] == {"spec": spec, "segments": [[0.5, 16.0], [0.4, 0.0], [0.5, 16.0]]}
    expected = schedule.arrival_times(BIG, 1.0, seed=2)  # the run's seed: --seed plus its index, 0
    assert [r["scheduled_s"] for r in run["requests"]] == expected
    assert all(r["success"] for r in run["requests"]) and run["summary"]["completed"] == len(expected)
    assert sorted(p.name for p in out.glob("*.png")) == ["latency_vs_rate.png", "load_over_time.png",
                                                         "throughput_vs_rate.png", "ttft_cdf.png"]
