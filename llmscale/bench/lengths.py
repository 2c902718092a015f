"""Token length distributions, written `KIND:PARAMS` on the command line."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from llmscale.config import ConfigError

USAGE = "fixed:N, uniform:LO,HI, normal:MEAN,STD or lognormal:MEAN,SIGMA"


@dataclass(frozen=True)
class LengthDist:
    kind: str  # fixed | uniform | normal | lognormal
    a: float  # N, LO or MEAN
    b: float = 0.0  # HI, STD or SIGMA

    def sample(self, rng: random.Random) -> int:
        match self.kind:
            case "fixed":
                x = self.a
            case "uniform":
                x = rng.randint(int(self.a), int(self.b))
            case "normal":
                x = rng.gauss(self.a, self.b)
            case _:  # lognormal, parameterised by its mean: mu = ln(mean) - sigma^2 / 2
                x = rng.lognormvariate(math.log(self.a) - self.b ** 2 / 2, self.b)
        return max(1, round(x))

    def __str__(self) -> str:
        nums = [self.a] if self.kind == "fixed" else [self.a, self.b]
        return f"{self.kind}:" + ",".join(f"{v:g}" for v in nums)


def parse_length(spec: str, flag: str) -> LengthDist:
    """'256' or 'fixed:256', 'uniform:64,512', 'normal:256,64', 'lognormal:256,1.0'."""
    kind, _, rest = spec.partition(":")
    if not rest:
        kind, rest = "fixed", spec
    try:
        nums = [float(x) for x in rest.split(",")]
    except ValueError:
        raise ConfigError(f"{flag}: expected {USAGE}; got {spec!r}") from None
    want = 1 if kind == "fixed" else 2
    if kind not in ("fixed", "uniform", "normal", "lognormal") or len(nums) != want:
        raise ConfigError(f"{flag}: expected {USAGE}; got {spec!r}")
    dist = LengthDist(kind, *nums)
    if dist.a < 1 or dist.b < 0 or (kind == "uniform" and dist.b < dist.a):
        raise ConfigError(f"{flag}: lengths must be >= 1, spreads >= 0 and LO <= HI; got {spec!r}")
    return dist
