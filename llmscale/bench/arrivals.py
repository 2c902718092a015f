"""When each request is sent: a gamma renewal process, as in vLLM's `bench serve`.

Gaps between arrivals are Gamma(shape=burstiness, scale=1/(rate*burstiness)): the mean gap is
always 1/rate, and the variance 1/(rate^2*burstiness). Burstiness 1 is a Poisson process;
below 1 requests come in clumps, above 1 they come more evenly.

A rate schedule (`--rate-schedule`) makes the rate vary with time, piecewise constant: steps,
a diurnal sinusoid or a file. The same gamma process then runs in expected-request units and
is mapped back to seconds (time rescaling), so burstiness keeps its meaning.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from llmscale.config import ConfigError


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start, non-decreasing; all 0 for an infinite rate."""
    if not rate > 0:
        raise ConfigError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0 or math.isinf(burstiness):
        raise ConfigError(f"burstiness must be a positive number, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    t, out = 0.0, []
    for _ in range(n):  # the first request goes at once, as in vLLM
        out.append(t)
        t += rng.gammavariate(burstiness, scale)
    return out


def parse_rates(spec: str, flag: str = "--sweep-rates") -> list[float]:
    """'0.5,1,2,inf' -> [0.5, 1.0, 2.0, inf]."""
    try:
        rates = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected numbers or inf, comma-separated; got {spec!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise ConfigError(f"{flag}: every rate must be > 0 (or inf), got {spec!r}")
    return rates


@dataclass(frozen=True)
class RateSchedule:
    """Piecewise-constant request rate: segments of (duration_s, rate req/s)."""
    segments: tuple[tuple[float, float], ...]
    spec: str  # what the user wrote, for reports

    def __post_init__(self) -> None:
        segments = tuple((float(d), float(r)) for d, r in self.segments)
        _check_segments(segments, "--rate-schedule", self.spec)
        object.__setattr__(self, "segments", segments)  # lists and ints in, float tuples out

    def _edges(self) -> tuple[list[float], list[float]]:
        """Running sums: each segment's end time and the expected requests up to its end, Λ."""
        ends, lams, t, lam = [], [], 0.0, 0.0
        for d, r in self.segments:
            t, lam = t + d, lam + d * r
            ends.append(t)
            lams.append(lam)
        return ends, lams

    @property
    def duration_s(self) -> float:
        return self._edges()[0][-1]

    @property
    def mean_rate(self) -> float:
        ends, lams = self._edges()
        return lams[-1] / ends[-1]

    def rate_at(self, t: float) -> float:
        """The rate in force at `t` seconds; 0 before the start and from the end on."""
        ends = self._edges()[0]
        i = bisect.bisect_right(ends, t)
        return self.segments[i][1] if t >= 0 and i < len(ends) else 0.0

    def arrival_times(self, max_requests: int, burstiness: float = 1.0, seed: int = 0) -> list[float]:
        """Send times within [0, duration_s), non-decreasing, at most max_requests of them.

        Time rescaling: a renewal process with Gamma(burstiness, 1/burstiness) gaps (mean 1) in
        units of expected requests, Λ(t) = ∫ rate, mapped back through Λ's inverse. Gaps then mean
        1/rate wherever the rate is constant, burstiness means what it means for a fixed rate, and
        a segment of rate 0 (where Λ stays flat) gets nothing. As for a fixed rate, the first
        request goes at Λ = 0: at once, or when the first segment with a positive rate starts."""
        if not burstiness > 0 or math.isinf(burstiness):
            raise ConfigError(f"burstiness must be a positive number, got {burstiness}")
        ends, lams = self._edges()
        rng = random.Random(seed)
        u, out = 0.0, []
        while u < lams[-1] and len(out) < max_requests:
            i = bisect.bisect_right(lams, u)  # the first segment whose Λ ends past u: its rate is > 0
            start, lam0 = (ends[i - 1], lams[i - 1]) if i else (0.0, 0.0)
            t = start + (u - lam0) / self.segments[i][1]
            out.append(min(t, math.nextafter(ends[i], -math.inf)))  # rounding must not reach the next segment
            u += rng.gammavariate(burstiness, 1.0 / burstiness)
        return out


SCHEDULE_FORMS = ("expected steps:R1xS1,R2xS2,... (R req/s for S s), diurnal:LOW,HIGH,PERIOD_S[,DURATION_S] "
                  "or a FILE of 'SECONDS,RATE' lines ending with 'END_SECONDS,0'")
DIURNAL_STEPS = 96  # constant segments per period: a 24 h period gets 15-minute steps
MAX_PERIODS = 1000


def _check_segments(segments: tuple[tuple[float, float], ...], flag: str, spec: str) -> None:
    if not segments:
        raise ConfigError(f"{flag}: no segments in {spec!r}; {SCHEDULE_FORMS}")
    if any(not 0 < d < math.inf for d, _ in segments):
        raise ConfigError(f"{flag}: every duration must be a finite number > 0, got {spec!r}")
    if any(not 0 <= r < math.inf for _, r in segments):
        raise ConfigError(f"{flag}: every rate must be a finite number >= 0, got {spec!r}")
    if not any(r > 0 for _, r in segments):
        raise ConfigError(f"{flag}: at least one rate must be > 0, got {spec!r}")


def _number(text: str, flag: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text.strip()!r} is not a number in {spec!r}; {SCHEDULE_FORMS}") from None


def _steps(body: str, flag: str, spec: str) -> list[tuple[float, float]]:
    """'1x30,4x30' -> [(30.0, 1.0), (30.0, 4.0)]: written rate first, stored duration first."""
    segments = []
    for part in body.split(","):
        rate, sep, seconds = part.strip().partition("x")
        if not sep:
            raise ConfigError(f"{flag}: expected RATExSECONDS, got {part.strip()!r} in {spec!r}")
        segments.append((_number(seconds, flag, spec), _number(rate, flag, spec)))
    return segments


def _diurnal(body: str, flag: str, spec: str) -> list[tuple[float, float]]:
    """A sinusoid from LOW at t=0 up to HIGH at PERIOD/2 and back, as DIURNAL_STEPS constant
    segments per period, each at the sinusoid's mean over it (so the expected count is exact)."""
    values = [_number(x, flag, spec) for x in body.split(",")]
    if len(values) not in (3, 4):
        raise ConfigError(f"{flag}: expected diurnal:LOW,HIGH,PERIOD_S[,DURATION_S], got {spec!r}")
    low, high, period = values[:3]
    duration = values[3] if len(values) == 4 else period
    if not (0 <= low <= high < math.inf and high > 0):
        raise ConfigError(f"{flag}: diurnal needs 0 <= LOW <= HIGH and HIGH > 0, got {spec!r}")
    if not (0 < period < math.inf and 0 < duration <= MAX_PERIODS * period):
        raise ConfigError(f"{flag}: diurnal needs PERIOD_S > 0 and 0 < DURATION_S <= {MAX_PERIODS} periods, "
                          f"got {spec!r}")
    w, step = 2 * math.pi / period, period / DIURNAL_STEPS
    segments = []
    for k in range(math.ceil(duration / step)):
        a, b = k * step, min((k + 1) * step, duration)
        if b > a:  # the last edge may round onto the duration
            mean_cos = (math.sin(w * b) - math.sin(w * a)) / (w * (b - a))
            segments.append((b - a, max(0.0, low + (high - low) * (1 - mean_cos) / 2)))
    return segments


def _schedule_file(path: Path, flag: str) -> list[tuple[float, float]]:
    """Lines 'SECONDS,RATE' (or 'SECONDS RATE'): the start of each segment and its rate, from 0,
    increasing; the last line, 'END_SECONDS,0', is where the schedule ends."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    points: list[tuple[float, float]] = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = [f for f in re.split(r"[,\s]+", line.split("#", 1)[0].strip()) if f]
        if not fields:
            continue
        if len(fields) != 2:
            raise ConfigError(f"{flag}: {path}:{n}: expected SECONDS,RATE, got {line.strip()!r}")
        t, r = (_number(f, flag, f"{path}:{n}") for f in fields)
        if not points and t != 0:
            raise ConfigError(f"{flag}: {path}:{n}: the first line must start at 0 seconds, got {t:g}")
        if points and not t > points[-1][0]:
            raise ConfigError(f"{flag}: {path}:{n}: times must increase, got {t:g} after {points[-1][0]:g}")
        points.append((t, r))
    if len(points) < 2 or points[-1][1] != 0:
        raise ConfigError(f"{flag}: {path}: needs at least two lines, the last 'END_SECONDS,0' (where the "
                          "schedule ends)")
    return [(b[0] - a[0], a[1]) for a, b in zip(points, points[1:], strict=False)]


def parse_rate_schedule(spec: str, flag: str = "--rate-schedule") -> RateSchedule:
    """'steps:1x30,4x30,1x30', 'diurnal:0.5,4,600[,1200]' or a FILE path -> a RateSchedule."""
    kind, sep, body = spec.strip().partition(":")
    if sep and kind == "steps":
        segments = _steps(body, flag, spec)
    elif sep and kind == "diurnal":
        segments = _diurnal(body, flag, spec)
    elif Path(spec).is_file():
        segments = _schedule_file(Path(spec), flag)
    else:
        raise ConfigError(f"{flag}: {spec!r} is neither a schedule nor a file; {SCHEDULE_FORMS}")
    segs = tuple(segments)
    _check_segments(segs, flag, spec)
    return RateSchedule(segs, spec)
