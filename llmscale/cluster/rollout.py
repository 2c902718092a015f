"""Fleet rollout: a new model onto the edge sites in waves, each checked before the next.

The sites (every `start: local` edge site, in file order, or the ones named) are cut into
cumulative waves (10%,50%,100%: the first wave takes ceil(10% of them), the second brings the
total to half, ...). One site at a time: placement stops sending it requests, the ones it has
finish, its replicas restart on the new model, and a probe set runs against it (greedy,
streamed, through its link). A site passes when it came up, its probes' error rate and TTFT
p99 are within the health SLO, and, when asked, its answers agree with the old model's on the
same probes (the mean share of each answer's text the two have in common from the start).

A site that fails rolls back the whole rollout, as an aborted deployment returns to its stable
version: every site updated so far restarts on the model it ran before. Every step goes to the
rollout's log, which `/edge/status` and `llmscale edge status` show.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmscale.cluster.gateway import CONTROL, Gateway, SiteRuntime
from llmscale.config import ConfigError

DEFAULT_PROBES = ("The capital of France is", "Write a haiku about the sea.",
                  "def add(a, b):", "Three facts about the moon:")
DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class HealthSlo:
    ttft_p99_ms: float = 5000.0
    error_rate: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> HealthSlo:
        """'ttft_p99_ms=2000,error_rate=0.05' (either may be left out)."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = part.partition("=")
            if key not in ("ttft_p99_ms", "error_rate"):
                raise ConfigError(f"--health-slo: unknown key {key!r}; expected ttft_p99_ms and error_rate")
            try:
                values[key] = float(value)
            except ValueError:
                raise ConfigError(f"--health-slo: {key} needs a number, got {value!r}") from None
        slo = cls(**values)
        if not (slo.ttft_p99_ms > 0 and 0 <= slo.error_rate <= 1):
            raise ConfigError("--health-slo: ttft_p99_ms must be > 0 and error_rate within 0..1")
        return slo


def parse_waves(spec: str) -> list[float]:
    """'10%,50%,100%' -> [0.1, 0.5, 1.0]: increasing, ending at 100%."""
    try:
        waves = [float(p.strip().removesuffix("%")) / 100 for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--waves: expected percentages such as 10%,50%,100%, got {spec!r}") from None
    if not waves or any(b <= a for a, b in zip(waves, waves[1:], strict=False)) or waves[0] <= 0 \
            or waves[-1] != 1.0:
        raise ConfigError(f"--waves: expected increasing percentages ending at 100%, got {spec!r}")
    return waves


def wave_sites(sites: list[str], fractions: list[float]) -> list[list[str]]:
    """Each wave's new sites: cumulative ceil(fraction x sites), empty waves dropped."""
    waves, done = [], 0
    for f in fractions:
        upto = min(len(sites), math.ceil(f * len(sites) - 1e-9))
        if upto > done:
            waves.append(sites[done:upto])
            done = upto
    return waves


@dataclass
class Rollout:
    model: str
    waves: list[list[str]]
    slo: HealthSlo
    probes: list[str]
    min_agreement: float | None
    probe_tokens: int = 16
    state: str = "running"  # running | done | rolled_back
    updated: list[str] = field(default_factory=list)
    previous: dict[str, str | None] = field(default_factory=dict)  # site -> the model it ran before
    log: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "state": self.state, "waves": self.waves, "updated": self.updated,
                "health_slo": {"ttft_p99_ms": self.slo.ttft_p99_ms, "error_rate": self.slo.error_rate},
                "min_agreement": self.min_agreement, "log": self.log}


def start_rollout(gateway: Gateway, body: dict[str, Any]) -> Rollout:
    """Check the request (ConfigError: one line) and start the rollout on the gateway's loop."""
    if gateway.rollout is not None and gateway.rollout.state == "running":
        raise ConfigError("a rollout is already running; wait for it (llmscale edge status)")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError("rollout: 'model' (a path as for --model) is required")
    if not Path(model).exists():
        raise ConfigError(f"rollout: model {model!r} not found on the gateway's machine")
    local_edges = [n for n, rt in gateway.sites.items() if rt.site.kind == "edge" and rt.local is not None]
    names = body.get("sites") or local_edges
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError("rollout: 'sites' must be a list of site names")
    unknown = [n for n in names if n not in local_edges]
    if unknown:
        raise ConfigError(f"rollout: {', '.join(unknown)} not a site started here by llmscale "
                          f"(edge sites it can update: {', '.join(local_edges) or 'none'})")
    if not names:
        raise ConfigError("rollout: the fleet has no edge site started here to update")
    probes = body.get("probes") or list(DEFAULT_PROBES)
    if not isinstance(probes, list) or not all(isinstance(p, str) and p for p in probes):
        raise ConfigError("rollout: 'probes' must be a list of prompts")
    agreement = body.get("min_agreement")
    if agreement is not None and (not isinstance(agreement, int | float) or not 0 <= agreement <= 1):
        raise ConfigError("rollout: 'min_agreement' must be within 0..1")
    rollout = Rollout(model, wave_sites(names, parse_waves(str(body.get("waves", "100%")))),
                      HealthSlo.parse(str(body.get("health_slo", ""))), probes, agreement)
    gateway.rollout = rollout
    asyncio.get_running_loop().create_task(_run(gateway, rollout))
    return rollout


def _log(gateway: Gateway, rollout: Rollout, message: str) -> None:
    rollout.log.append({"t": round(time.time() - rollout.started, 2), "message": message})
    gateway.note(f"rollout: {message}")


async def _run(gateway: Gateway, rollout: Rollout) -> None:
    _log(gateway, rollout, f"{rollout.model} onto {sum(map(len, rollout.waves))} site(s) in "
                           f"{len(rollout.waves)} wave(s)")
    for k, wave in enumerate(rollout.waves, 1):
        _log(gateway, rollout, f"wave {k}/{len(rollout.waves)}: {', '.join(wave)}")
        for name in wave:
            rt = gateway.sites[name]
            problem = await _update(gateway, rollout, rt)
            if problem is not None:
                _log(gateway, rollout, f"{name} failed: {problem}; rolling back")
                await _roll_back(gateway, rollout)
                return
        _log(gateway, rollout, f"wave {k} passed")
    rollout.state = "done"
    _log(gateway, rollout, "done")


async def _update(gateway: Gateway, rollout: Rollout, rt: SiteRuntime) -> str | None:
    """Move one site to the new model and check it; the problem, or None when it passed."""
    assert rt.local is not None
    baseline = await _probe(gateway, rollout, rt) if rollout.min_agreement is not None else None
    rt.updating = True
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while rt.state.inflight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        rt.refresh(time.monotonic())
    rollout.previous.setdefault(rt.site.name, rt.local.model)
    rollout.updated.append(rt.site.name)
    _log(gateway, rollout, f"{rt.site.name}: restarting on {rollout.model}")
    problem = await _restart(gateway, rt, rollout.model)
    if problem is not None:
        return problem
    results = await _probe(gateway, rollout, rt)
    errors = sum(1 for r in results if r is None) / len(results)
    ttfts = sorted(r[0] for r in results if r is not None)
    if errors > rollout.slo.error_rate:
        return f"error rate {errors:.2f} over the health SLO's {rollout.slo.error_rate:.2f}"
    p99 = ttfts[min(len(ttfts) - 1, math.ceil(0.99 * len(ttfts)) - 1)] * 1e3
    if p99 > rollout.slo.ttft_p99_ms:
        return f"TTFT p99 {p99:.0f} ms over the health SLO's {rollout.slo.ttft_p99_ms:.0f} ms"
    summary = f"errors {errors:.2f}, TTFT p99 {p99:.0f} ms"
    if baseline is not None and rollout.min_agreement is not None:
        agreement = _agreement(baseline, results)
        summary += f", agreement {agreement:.2f}"
        if agreement < rollout.min_agreement:
            return f"agreement with the old model {agreement:.2f} under {rollout.min_agreement:.2f}"
    rt.updating = False
    _log(gateway, rollout, f"{rt.site.name}: passed ({summary})")
    return None


async def _restart(gateway: Gateway, rt: SiteRuntime, model: str | None) -> str | None:
    assert rt.local is not None
    local = rt.local
    await asyncio.to_thread(local.stop)
    rt.state.model_name = None
    for rep in rt.replicas:
        rep.healthy, rep.misses = False, 0
    await asyncio.to_thread(local.start, model)
    try:
        name = await asyncio.to_thread(local.wait_ready, gateway.start_timeout_s)
    except ConfigError as e:
        return f"did not come up ({e})"
    rt.state.model_name = name
    for rep in rt.replicas:
        rep.healthy = True
    return None


async def _roll_back(gateway: Gateway, rollout: Rollout) -> None:
    for name in reversed(rollout.updated):
        rt = gateway.sites[name]
        old = rollout.previous[name]
        rt.updating = True
        problem = await _restart(gateway, rt, old)
        rt.updating = False
        _log(gateway, rollout, f"{name}: back on {old or 'the built-in model'}"
                               + (f" but {problem}" if problem else ""))
    rollout.state = "rolled_back"
    _log(gateway, rollout, "rolled back")


async def _probe(gateway: Gateway, rollout: Rollout, rt: SiteRuntime) -> list[tuple[float, str] | None]:
    """Each probe's (TTFT, text) from the site's first replica, or None where it failed."""
    url = rt.endpoint(CONTROL, 0) + "/v1/completions"
    out: list[tuple[float, str] | None] = []
    async with httpx.AsyncClient(timeout=60.0, trust_env=False) as client:
        for prompt in rollout.probes:
            body = {"prompt": prompt, "max_tokens": rollout.probe_tokens, "temperature": 0, "stream": True}
            sent = time.monotonic()
            ttft, text = None, []
            try:
                async with client.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        out.append(None)
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise ValueError(chunk["error"])
                        ttft = ttft if ttft is not None else time.monotonic() - sent
                        text.append(chunk["choices"][0].get("text", ""))
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                out.append(None)
                continue
            out.append(None if ttft is None else (ttft, "".join(text)))
    return out


def _agreement(old: list[tuple[float, str] | None], new: list[tuple[float, str] | None]) -> float:
    """Mean over probes both answered of their common leading text / the longer answer."""
    shares = []
    for a, b in zip(old, new, strict=True):
        if a is None or b is None:
            continue
        x, y = a[1], b[1]
        common = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        shares.append(common / max(len(x), len(y), 1))
    return sum(shares) / len(shares) if shares else 0.0
