"""The SLO autoscaling policy's decisions (`cluster/autoscale.decide`) and its inputs, without
Ray: properties over random signals, and the cases whose answer is known by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmscale.cluster.autoscale import DOWN_AT, UP_AT, LatencyWindow, Signals, StepWindow, Targets, decide

from .test_plan_cli import one_line_error, run_cli

TARGETS = Targets(min_replicas=1, max_replicas=4, ttft_s=1.0, tpot_s=0.1)


def signals(replicas: int = 2, running: float = 4, waiting: float = 0, queued: float = 0,
            ttft_s: float | None = 0.6, tpot_s: float | None = 0.06, step_s: float | None = 0.05) -> Signals:
    return Signals(replicas, running, waiting, queued, ttft_s, tpot_s, step_s)


count = st.floats(0, 500)
any_signals = st.builds(Signals, replicas=st.integers(0, 8), running=count, waiting=count, queued=count,
                        ttft_s=st.one_of(st.none(), st.floats(0, 10)),
                        tpot_s=st.one_of(st.none(), st.floats(0, 1)),
                        step_s=st.one_of(st.none(), st.floats(0, 1)),
                        target=st.one_of(st.none(), st.integers(0, 8)))
any_targets = st.integers(0, 4).flatmap(lambda low: st.builds(
    Targets, min_replicas=st.just(low), max_replicas=st.integers(max(low, 1), 8),
    ttft_s=st.floats(0.05, 5), tpot_s=st.floats(0.005, 0.5)))


@given(any_signals, any_targets, st.floats(0, 64))
def test_decisions_stay_within_the_bounds(s: Signals, t: Targets, peak: float) -> None:
    d = decide(s, t, peak)
    assert t.min_replicas <= d.replicas <= t.max_replicas
    assert d.reason


@given(any_signals, any_targets, st.floats(0, 64))
def test_waiting_requests_never_lower_the_count_and_raise_it_below_the_maximum(
        s: Signals, t: Targets, peak: float) -> None:
    d = decide(s, t, peak)
    if s.waiting > 0 or (s.queued > 0 and s.replicas == 0):
        assert d.signal == "queue"
        assert d.replicas >= min(t.max_replicas, max(s.replicas + 1, t.min_replicas))
    if d.signal == "hold" and s.target is not None:  # what Serve is moving to, up or down
        assert d.replicas == min(t.max_replicas, max(s.target, t.min_replicas, 1))
    else:
        lowest = min(t.max_replicas, max(s.replicas, t.min_replicas))
        assert d.replicas >= lowest or d.signal in ("idle", "down")


@given(any_signals, any_targets, st.floats(0, 64))
def test_anything_running_keeps_a_replica(s: Signals, t: Targets, peak: float) -> None:
    if s.running + s.waiting + s.queued > 0:
        assert decide(s, t, peak).replicas >= 1


@given(any_targets, st.integers(0, 8), st.floats(0, 64))
def test_idle_goes_to_the_minimum(t: Targets, replicas: int, peak: float) -> None:
    d = decide(signals(replicas, running=0, ttft_s=None, tpot_s=None, step_s=None), t, peak)
    assert (d.replicas, d.signal) == (t.min_replicas, "idle")


def test_a_latency_near_its_target_adds_replicas_before_it_is_missed() -> None:
    d = decide(signals(replicas=2, tpot_s=0.09), TARGETS, 4)  # TPOT at 90% of its target
    assert d.signal == "latency" and "TPOT p90 90 ms" in d.reason
    assert d.replicas == 3  # max(2 + 1, ceil(2 * 0.9 / 0.8))
    d = decide(signals(replicas=2, ttft_s=2.0), TARGETS, 4)  # TTFT twice its target
    assert (d.replicas, d.signal) == (4, "latency")  # ceil(2 * 2.0 / 0.8) = 5, capped at 4


def test_slow_decode_steps_add_replicas_before_the_requests_tpot_shows_it() -> None:
    """The requests' p90 still looks fine (it covers the last seconds), but every step is slow now."""
    d = decide(signals(replicas=1, tpot_s=0.05, step_s=0.2), TARGETS, 4)
    assert d.signal == "latency" and "decode step 200 ms against a target of 100 ms" in d.reason
    assert d.replicas == 3  # ceil(1 * 2.0 / 0.8)
    # ...and slow steps keep a count from going down even when the p90s are low.
    assert decide(signals(replicas=3, running=3, ttft_s=0.1, tpot_s=0.01, step_s=0.07), TARGETS,
                  peak_ok_per_replica=4).signal == "hold"


def test_hold_keeps_a_replica_that_is_still_starting() -> None:
    """One replica runs, Serve is starting a second: within the SLO, both stay wanted."""
    starting = Signals(replicas=1, running=4, waiting=0, queued=0, ttft_s=0.6, tpot_s=0.06, step_s=0.05,
                       target=2)
    assert (decide(starting, TARGETS, 4).replicas, decide(starting, TARGETS, 4).signal) == (2, "hold")
    assert decide(signals(replicas=1), TARGETS, 4).replicas == 1  # no target known: what runs


def test_a_queue_adds_the_replicas_it_would_fill() -> None:
    # 2 replicas run 3 requests each; 7 waiting fill ceil(7 / 3) = 3 more.
    d = decide(signals(replicas=2, running=6, waiting=5, queued=2), TARGETS, 4)
    assert (d.replicas, d.signal) == (4, "queue")  # 5, capped
    d = decide(signals(replicas=0, running=0, queued=1), Targets(0, 3, 1.0, 0.1), 0)
    assert (d.replicas, d.signal) == (1, "queue")  # from zero: one per request it would run
    # Requests at the handles while the engines queue nothing are in transit (or wait for a
    # replica that is starting): no more replicas for them.
    assert decide(signals(replicas=1, running=1, queued=0.9), TARGETS, 0).signal == "hold"


def test_scales_down_to_the_load_seen_within_the_slo_only_when_latency_is_low() -> None:
    relaxed = signals(replicas=3, running=3, ttft_s=DOWN_AT * 0.9, tpot_s=0.01, step_s=0.01)
    d = decide(relaxed, TARGETS, peak_ok_per_replica=4)
    assert (d.replicas, d.signal) == (1, "down")  # 3 <= 0.75 * 4
    assert decide(relaxed, TARGETS, peak_ok_per_replica=3).replicas == 2  # ceil(3 / 2.25)
    assert decide(relaxed, TARGETS, peak_ok_per_replica=0).signal == "hold"  # no evidence yet
    between = signals(replicas=3, running=3, ttft_s=(DOWN_AT + UP_AT) / 2, tpot_s=0.01, step_s=0.01)
    assert decide(between, TARGETS, peak_ok_per_replica=4).signal == "hold"


def test_latency_window_keeps_recent_requests_and_reports_their_p90() -> None:
    now = [0.0]
    window = LatencyWindow(window_s=10.0, clock=lambda: now[0])
    assert window.p90() == (None, None)
    for i in range(1, 11):
        window.add_ttft(i / 10)
        if i < 10:
            window.add_tpot(i / 100)
    assert window.p90() == (pytest.approx(0.9), pytest.approx(0.09))  # 9th of 10; 9th of 9
    now[0] = 10.5
    window.add_tpot(0.5)
    assert window.p90() == (None, pytest.approx(0.5))  # the first samples expired


@pytest.mark.parametrize("flags,needle", [
    (["--target-ttft-ms", "500"], "--target-ttft-ms apply to autoscaling"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas <= --max-replicas"),
    (["--max-replicas", "0"], "--max-replicas >= 1"),
    (["--min-replicas", "0", "--max-replicas", "2", "--target-tpot-ms", "0"], "must be > 0"),
    (["--min-replicas", "1", "--max-replicas", "2", "--downscale-delay-s", "-1"], "must be >= 0"),
])
def test_bad_autoscaling_flags_are_one_line_errors(flags: list[str], needle: str) -> None:
    assert needle in one_line_error(run_cli("cluster", "serve", *flags))


def test_step_window_reports_seconds_per_step_over_its_last_seconds() -> None:
    now = [0.0]
    window = StepWindow(window_s=3.0, clock=lambda: now[0])
    assert window.mean_step(0, 0.0) is None  # nothing stepped yet
    now[0] = 1.0
    assert window.mean_step(10, 0.5) == pytest.approx(0.05)  # 10 steps in 0.5 s
    now[0] = 2.0
    assert window.mean_step(11, 0.8) == pytest.approx(0.8 / 11)  # one 300 ms step weighs as one step
    now[0] = 4.5  # the window now starts at 1.5 s: from the sample at 1.0 s on
    assert window.mean_step(21, 1.3) == pytest.approx((1.3 - 0.5) / (21 - 10))
    now[0] = 9.0
    assert window.mean_step(21, 1.3) is None  # idle for the whole window
