"""When each request is sent: a gamma renewal process, as in vLLM's `bench serve`.

Gaps between arrivals are Gamma(shape=burstiness, scale=1/(rate*burstiness)): the mean gap is
always 1/rate, and the variance 1/(rate^2*burstiness). Burstiness 1 is a Poisson process;
below 1 requests come in clumps, above 1 they come more evenly.
"""

from __future__ import annotations

import math
import random

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
