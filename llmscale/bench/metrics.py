"""Per-request timings and the aggregates the field reports (vLLM's `bench serve` names).

TTFT: send -> first token. TPOT: (E2E - TTFT) / (output tokens - 1), undefined for one-token
outputs. ITL: the gaps between streamed chunks that carry text. E2E: send -> last byte.
Goodput (DistServe): requests per second that meet every SLO; a request without a TPOT (one
output token) meets any TPOT SLO, as in vLLM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from llmscale.bench.arrivals import RateSchedule
from llmscale.config import ConfigError

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    index: int  # position in the workload
    prompt_tokens: int  # the server's count when it reports usage, else the workload's
    max_tokens: int
    scheduled_s: float  # planned send time, from the run's start
    start_s: float = 0.0  # actual send time, from the run's start
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0  # the server's usage count, else the number of text chunks
    usage_reported: bool = False
    success: bool = False
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_s": self.tpot_s}


@dataclass
class Run:
    """One load run at one request rate (with a rate schedule: its mean rate)."""
    label: str  # what ran (a system, a policy); the same for every run of a sweep
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    seed: int
    duration_s: float  # first send -> last response (or the interruption)
    requests: list[RequestResult]
    interrupted: str | None = None  # why the run stopped early, if it did
    rate_schedule: RateSchedule | None = None  # the rate schedule the run followed, if any


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default (and vLLM) computes it."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    out = {"mean": sum(ms) / len(ms) if ms else math.nan}
    out.update({f"p{q}": percentile(ms, q) for q in PERCENTILES})
    return out


def parse_slo(spec: str | None, keys: tuple[str, ...] = SLO_KEYS) -> dict[str, float]:
    """'ttft_ms=2000,tpot_ms=200' -> {'ttft_ms': 2000.0, 'tpot_ms': 200.0}, each key one of `keys`."""
    slo: dict[str, float] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or key not in keys or not number > 0:
            raise ConfigError(f"--slo: expected KEY=MS pairs with KEY in {', '.join(keys)} and MS > 0, "
                              f"got {part.strip()!r}")
        slo[key] = number
    return slo


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.success or r.ttft_s is None or r.e2e_s is None:
        return False
    tpot = r.tpot_s
    return (r.ttft_s * 1e3 <= slo.get("ttft_ms", math.inf)
            and (tpot is None or tpot * 1e3 <= slo.get("tpot_ms", math.inf))
            and r.e2e_s * 1e3 <= slo.get("e2e_ms", math.inf))


def summarize(run: Run, slo: dict[str, float] | None = None) -> dict[str, Any]:
    ok = [r for r in run.requests if r.success]
    dur = run.duration_s if run.duration_s > 0 else math.nan
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "completed": len(ok), "failed": len(run.requests) - len(ok), "duration_s": run.duration_s,
        "prompt_tokens": prompt, "output_tokens": output,
        "request_throughput": len(ok) / dur, "output_throughput": output / dur,
        "total_token_throughput": (prompt + output) / dur,
        "ttft_ms": stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": stats_ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": stats_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in run.requests)
        out["slo"] = dict(slo)
        out["goodput"] = good / dur
        out["slo_attainment"] = good / len(run.requests) if run.requests else math.nan
    return out


def max_rate_meeting_slo(runs: list[Run], slo: dict[str, float], attainment: float) -> float | None:
    """DistServe's goodput of a sweep: the highest request rate whose runs meet every SLO for at
    least `attainment` of their requests (None when no rate does)."""
    good = [r.request_rate for r in runs if summarize(r, slo)["slo_attainment"] >= attainment]
    return max(good, default=None)
