"""Autoscaling the engine replicas to a latency SLO: a Ray Serve custom autoscaling policy.

Each replica reports what its engine is doing (running and waiting requests, KV usage) and the
p90 TTFT and TPOT of its requests over the last `LATENCY_WINDOW_S` seconds
(`EngineReplica.record_autoscaling_stats`, from a `LatencyWindow`): a TTFT when a request's
first token comes out, a TPOT every `TPOT_SAMPLE_TOKENS` tokens and when it finishes, so a
burst of long requests shows before any of them ends. Serve averages each over its
look-back period and calls `SloAutoscaler` on every control tick; `decide` turns the replicas'
signals into a replica count:

- **idle**: nothing running, waiting or queued at the handles: the minimum. Serve holds the
  current count for `downscale_delay_s` first, and scales to zero only after
  `downscale_to_zero_delay_s` (`--scale-to-zero-after-s`) when the minimum is 0.
- **queue**: requests wait in the engines' queues (and then also at Serve's handles, or there
  is no replica): as many more replicas as the waiting requests would fill at the
  concurrency each replica runs now.
- **latency**: the recent p90 TTFT or TPOT, or the engines' mean decode step (the gap between
  tokens right now: a TPOT without the window's lag), is above `UP_AT` of its target: the count
  scaled by the worst ratio, at least one more. Acting before the target is missed is the point:
  a new replica takes seconds to start. On a CPU the decode step is the first to move: a load
  past what a replica keeps within the TPOT target slows every step at once, while the
  requests' p90 over `LATENCY_WINDOW_S` follows seconds later.
- **down**: both p90s and the decode step are under `DOWN_AT` of their targets and nothing
  waits: the fewest replicas that hold the running requests at `DOWN_FILL` of the highest
  per-replica concurrency seen within the SLO (kept in the policy's state), never fewer than
  one while anything runs.
- otherwise **hold** the count Serve is moving to (a replica still starting stays wanted).

Serve bounds the answer by `--min-replicas`/`--max-replicas` and applies the up/down delays;
a request arriving with no replica at all starts one at once (Serve's cold-start path, which
bypasses the policy; the policy notes it on its next tick). Every change of the target is
reported to the cluster's `StatusBoard` with its reason: `cluster serve` prints it, and
`/metrics` and `/cluster/status` export it.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

LATENCY_WINDOW_S = 20.0  # how far back a replica's latency samples reach
STEP_WINDOW_S = 3.0  # how far back a replica's mean decode step reaches
TPOT_SAMPLE_TOKENS = 16  # a running request adds a TPOT sample this often
UP_AT = 0.8  # scale up once a latency passes this fraction of its target
DOWN_AT = 0.5  # scale down only while every latency is under this fraction of its target
DOWN_FILL = 0.75  # ...and the replicas left would run this fraction of the load seen within the SLO
METRICS_INTERVAL_S = 0.5  # how often replicas report (Serve's default, 10 s, makes cold starts slow)
LOOK_BACK_S = 2.5  # the window Serve averages the reports over: a few reports, no more


@dataclass(frozen=True)
class AutoscalingOptions:
    """`llmscale cluster serve`'s autoscaling flags."""

    min_replicas: int
    max_replicas: int
    target_ttft_ms: float = 2000.0
    target_tpot_ms: float = 200.0
    scale_to_zero_after_s: float = 300.0
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 30.0

    def validate(self) -> None:
        from llmscale.config import ConfigError

        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1 "
                              f"(got {self.min_replicas} and {self.max_replicas})")
        if self.target_ttft_ms <= 0 or self.target_tpot_ms <= 0:
            raise ConfigError("--target-ttft-ms and --target-tpot-ms must be > 0")
        if min(self.scale_to_zero_after_s, self.upscale_delay_s, self.downscale_delay_s) < 0:
            raise ConfigError("--scale-to-zero-after-s, --upscale-delay-s and --downscale-delay-s "
                              "must be >= 0")

    def describe(self) -> dict[str, Any]:
        """What the status board shows of them."""
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ttft_ms": self.target_ttft_ms, "target_tpot_ms": self.target_tpot_ms}

    def serve_config(self, board: str, namespace: str) -> dict[str, Any]:
        """The deployment's `autoscaling_config`: bounds, delays, how often replicas report, and
        this module's policy reporting to the board named `board`."""
        from ray.serve.config import AutoscalingPolicy

        policy = AutoscalingPolicy(
            policy_function=f"{SloAutoscaler.__module__}:{SloAutoscaler.__qualname__}",
            policy_kwargs={"target_ttft_ms": self.target_ttft_ms, "target_tpot_ms": self.target_tpot_ms,
                           "board": board, "namespace": namespace})
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": self.min_replicas, "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "downscale_to_zero_delay_s": self.scale_to_zero_after_s,
                "metrics_interval_s": METRICS_INTERVAL_S, "look_back_period_s": LOOK_BACK_S,
                "policy": policy}


class LatencyWindow:
    """Recent TTFT and TPOT samples of one replica; the p90 of each over the last `window_s`."""

    def __init__(self, window_s: float = LATENCY_WINDOW_S, clock: Any = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.ttft: collections.deque[tuple[float, float]] = collections.deque()
        self.tpot: collections.deque[tuple[float, float]] = collections.deque()

    def add_ttft(self, seconds: float) -> None:
        self.ttft.append((self.clock(), seconds))

    def add_tpot(self, seconds: float) -> None:
        self.tpot.append((self.clock(), seconds))

    def p90(self) -> tuple[float | None, float | None]:
        """(TTFT p90, TPOT p90) over the window; None where it holds no sample."""
        horizon = self.clock() - self.window_s
        for samples in (self.ttft, self.tpot):
            while samples and samples[0][0] < horizon:
                samples.popleft()
        return _p90([v for _, v in self.ttft]), _p90([v for _, v in self.tpot])


class StepWindow:
    """An engine's mean decode step over the last `window_s`: seconds stepping over steps made, from
    its cumulative counters (`decode_steps`, `decode_step_s`) sampled on every stats call. Over a
    few seconds, so one long step (a prefill chunk beside the decodes) weighs as the tokens it
    delayed, not as a report of its own."""

    def __init__(self, window_s: float = STEP_WINDOW_S, clock: Any = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.samples: collections.deque[tuple[float, float, float]] = collections.deque()

    def mean_step(self, steps: float, seconds: float) -> float | None:
        """Record the counters now; the mean step since the oldest sample in the window (None: no
        step made since)."""
        now = self.clock()
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window_s:
            self.samples.popleft()  # keep one sample at or before the window's start
        self.samples.append((now, steps, seconds))
        _, first_steps, first_seconds = self.samples[0]
        if steps <= first_steps:
            return None
        return (seconds - first_seconds) / (steps - first_steps)


def _p90(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Targets:
    min_replicas: int
    max_replicas: int
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class Signals:
    """A deployment's state as the policy sees it, summed (or, latencies, averaged) over replicas."""

    replicas: int  # running now
    running: float  # requests the engines run
    waiting: float  # requests the engines hold in their queues
    queued: float  # requests waiting at Serve's handles for a replica with room
    ttft_s: float | None  # mean over replicas of their recent p90; None: no request finished
    tpot_s: float | None
    step_s: float | None = None  # mean over replicas of their mean decode step; None: none made
    target: int | None = None  # the count Serve is moving to (replicas may still be starting)


@dataclass(frozen=True)
class Decision:
    replicas: int
    signal: str  # idle | queue | latency | down | hold | cold-start
    reason: str


def latency_ratios(s: Signals, t: Targets) -> dict[str, float]:
    """Each latency the replicas report, over its target: TTFT p90, TPOT p90 and the decode step
    (which a TPOT target bounds too); only those measured."""
    measured = (("TTFT p90", s.ttft_s, t.ttft_s), ("TPOT p90", s.tpot_s, t.tpot_s),
                ("decode step", s.step_s, t.tpot_s))
    return {name: value / target for name, value, target in measured if value is not None}


def decide(s: Signals, t: Targets, peak_ok_per_replica: float) -> Decision:
    """The replica count for these signals (see the module docstring), within the bounds.
    `peak_ok_per_replica`: the most running requests per replica seen within the SLO (0: none yet)."""
    current = max(s.replicas, 0)

    def bounded(n: int) -> int:
        return max(t.min_replicas, min(t.max_replicas, n))

    if s.running + s.waiting + s.queued <= 0:
        return Decision(bounded(t.min_replicas), "idle", "no request running or waiting")
    # Requests at the handles are demand the replicas cannot take only when their engines queue
    # too (or there is no replica); otherwise they are in transit, or wait for a replica that is
    # starting, and Serve's averages still hold them for a look-back period.
    pending = s.waiting + (s.queued if s.waiting > 0 or current == 0 else 0.0)
    if pending > 0:
        per_replica = max(1.0, s.running / max(current, 1))
        more = math.ceil(pending / per_replica)
        return Decision(bounded(current + more), "queue",
                        f"{pending:.1f} requests waiting beside {s.running:.1f} running on {current} "
                        f"replica(s)")
    ratios = latency_ratios(s, t)
    if ratios and max(ratios.values()) > UP_AT:
        name, ratio = max(ratios.items(), key=lambda kv: kv[1])
        want = max(current + 1, math.ceil(current * ratio / UP_AT))
        target_ms = (t.ttft_s if name == "TTFT p90" else t.tpot_s) * 1e3
        return Decision(bounded(want), "latency",
                        f"{name} {ratio * target_ms:.0f} ms against a target of {target_ms:.0f} ms")
    if current > 1 and ratios and max(ratios.values()) < DOWN_AT and peak_ok_per_replica > 0:
        want = max(1, math.ceil(s.running / (DOWN_FILL * peak_ok_per_replica)))
        if want < current:
            return Decision(bounded(want), "down",
                            f"{s.running:.1f} running fit {want} replica(s) at {DOWN_FILL:.0%} of the "
                            f"{peak_ok_per_replica:.1f} per replica seen within the SLO")
    # Hold what Serve is moving to, not what runs now: a replica still starting stays wanted.
    held = current if s.target is None else s.target
    return Decision(bounded(max(held, 1)), "hold", "within the SLO")


def signals_of(ctx: Any) -> Signals:
    """The policy's inputs from Serve's `AutoscalingContext`: the replicas' reports averaged over
    the look-back period, summed over replicas (latencies: averaged)."""
    metrics = ctx.aggregated_metrics or {}

    def total(name: str) -> float:
        return float(sum(metrics.get(name, {}).values()))

    def mean(name: str) -> float | None:
        values = list(metrics.get(name, {}).values())
        return sum(values) / len(values) if values else None

    return Signals(replicas=ctx.current_num_replicas, running=total("running"), waiting=total("waiting"),
                   queued=float(ctx.total_queued_requests or 0.0), ttft_s=mean("ttft_p90_s"),
                   tpot_s=mean("tpot_p90_s"), step_s=mean("step_s"), target=ctx.target_num_replicas)


class SloAutoscaler:
    """The policy Serve calls (`AutoscalingPolicy(policy_function=<this class>, policy_kwargs=...)`):
    one instance per deployment, in Serve's controller. Its bounds are the deployment's, as Serve
    adjusts them to the cluster's capacity. Reports each change of the target to the status
    board named `board` (in `namespace`)."""

    def __init__(self, target_ttft_ms: float, target_tpot_ms: float, board: str, namespace: str) -> None:
        self.ttft_s, self.tpot_s = target_ttft_ms / 1e3, target_tpot_ms / 1e3
        self.board_name, self.namespace = board, namespace
        self.board: Any = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state)
        s = signals_of(ctx)
        targets = Targets(ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas,
                          self.ttft_s, self.tpot_s)
        peak = float(state.get("peak_ok_per_replica", 0.0))
        ratios = latency_ratios(s, targets)
        if s.replicas and "TTFT p90" in ratios and max(ratios.values()) <= 1:  # the SLO held
            peak = max(peak, s.running / s.replicas)
        state["peak_ok_per_replica"] = peak
        wanted = state.get("wanted", ctx.target_num_replicas)
        if state.get("seen_target") == 0 and ctx.target_num_replicas > 0 and wanted == 0:
            # The target left zero without this policy: Serve's path for a request with no replica.
            wanted = ctx.target_num_replicas
            self._report(Decision(wanted, "cold-start", "a request arrived with no replica running"), 0, s)
        decision = decide(s, targets, peak)
        if decision.signal == "hold" and decision.replicas > wanted:  # a wanted scale-down undone
            decision = Decision(decision.replicas, "hold",
                                "requests came back before the scale-down took effect")
        if decision.replicas != wanted:
            self._report(decision, wanted, s)
        state["wanted"], state["seen_target"] = decision.replicas, ctx.target_num_replicas
        return decision.replicas, state

    def _report(self, decision: Decision, previous: int, s: Signals) -> None:
        import ray

        if self.board is None:
            try:
                self.board = ray.get_actor(self.board_name, namespace=self.namespace)
            except ValueError:  # the cluster is shutting down
                return
        self.board.record_decision.remote({**asdict(decision), "previous": previous,
                                           "running_replicas": s.replicas, "time_s": time.time()})
