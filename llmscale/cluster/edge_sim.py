"""`llmscale edge simulate`: a whole fleet of sites serving its users, in simulated time.

Each site's replicas are the planner's `SimEngine`s (the engine's scheduler and KV cache, its
`hardware:` catalogue entry's step time), so batching and queueing inside a site are the
engine's. Around them: N users, each homed at a site (edge sites more often) and placed within
`HOME_RADIUS_KM` of it, some tagging every request with their home jurisdiction; Poisson
arrivals from random users; `placement.place` choosing the site of each request from the
sites' live state (health, requests in flight, prefill speed, recent service time); the
network adding half the route's RTT each way; and sites going down (their requests in flight
fail over, resuming where the stream stopped) and coming back empty.

One discrete-event loop (arrival, delivery to a site, step end, site down/up) runs it all.
The report groups requests by the users' home jurisdiction and by the kind of site that served
them, per site (busy share, cost), and checks residency independently of `place`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmscale.bench.metrics import percentile
from llmscale.bench.roofline import Chunk
from llmscale.cluster.placement import Demand, SiteState, Unplaceable, place
from llmscale.cluster.sites import Fleet, Location, Site, load_fleet
from llmscale.config import ConfigError
from llmscale.console import fmt_bytes, stdout_console
from llmscale.plan.deployment import Deployment, ModelSpec
from llmscale.plan.hardware import load_catalogue
from llmscale.plan.simulator import IDLE_POLL_S, SimEngine, SimStep
from llmscale.plan.step_model import StepModel

HOME_RADIUS_KM = 150.0
EDGE_HOME_WEIGHT = 3.0  # an edge site is the home of this many times the users of a cloud site
# Weights a site runs: GPUs bf16; a CPU box int4, since its decode streams weights from DRAM.
WEIGHT_FORMAT = {"gpu": "bf16", "cpu": "int4"}
UP_BYTES_PER_TOKEN = 4  # a prompt token as request text
DOWN_BYTES_PER_TOKEN = 80  # one streamed token: an SSE chunk
SERVICE_EMA = 0.05  # weight of one finished request in a site's recent service time
STEP_EMA = 0.2  # weight of one step in a site's recent step length
PREFILL_EMA = 0.2  # weight of one observed TTFT in a site's prefill speed (as the gateway learns it)
KM_PER_DEGREE = 111.2


# ----- options -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """`SITE@T` (down from T to the end) or `SITE@T-T2` (back at T2), in simulated seconds."""

    site: str
    down_s: float
    up_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> Failure:
        site, sep, when = text.partition("@")
        start, dash, end = when.partition("-")
        try:
            down, up = float(start), (float(end) if dash else None)
        except ValueError:
            down, up = math.nan, None
        if not sep or not site or not down >= 0 or (up is not None and not up > down):
            raise ConfigError(f"--fail: expected SITE@T or SITE@T-T2 in seconds (T2 > T >= 0), got {text!r}")
        return cls(site, down, up)


def parse_len(text: str, flag: str) -> tuple[int, int]:
    """'512' -> (512, 512); '64:1024' -> uniform over 64..1024."""
    lo, sep, hi = text.partition(":")
    try:
        bounds = (int(lo), int(hi) if sep else int(lo))
    except ValueError:
        bounds = (0, 0)
    if not 1 <= bounds[0] <= bounds[1]:
        raise ConfigError(f"{flag}: expected N or LO:HI tokens (1 <= LO <= HI), got {text!r}")
    return bounds


@dataclass(frozen=True)
class SimOptions:
    users: int = 1000
    rate: float = 10.0  # requests/s over the whole fleet
    duration_s: float = 60.0  # of arrivals; the run goes on until every request is answered
    prompt_len: tuple[int, int] = (512, 512)
    output_len: tuple[int, int] = (128, 128)
    residency_share: float = 0.3
    ttft_slo_s: float | None = None  # None: the fleet's ttft_ms
    failures: tuple[Failure, ...] = ()
    hardware: Path | None = None  # a catalogue file on top of the shipped one
    seed: int = 0

    def check(self, fleet: Fleet) -> None:
        if self.users < 1 or not self.rate > 0 or not self.duration_s > 0:
            raise ConfigError("--users, --rate and --duration must be positive")
        if not 0 <= self.residency_share <= 1:
            raise ConfigError(f"--residency-share must be within 0..1, got {self.residency_share}")
        for f in self.failures:
            if f.site not in fleet.sites:
                raise ConfigError(f"--fail {f.site}: not a site; sites: {', '.join(fleet.sites)}")


# ----- the report ----------------------------------------------------------------------------

@dataclass
class RequestRecord:
    """One request as its user saw it (times from the run's start, seconds)."""

    index: int
    user: int
    home_site: str
    home: str  # its jurisdiction
    residency: frozenset[str] | None
    prompt_tokens: int
    output_tokens: int  # asked for
    start_s: float
    sites: list[str] = field(default_factory=list)  # each site that took it, failovers included
    first_token_s: float | None = None  # reached the user
    end_s: float | None = None  # last token reached the user
    refused: str | None = None

    @property
    def site(self) -> str | None:
        return self.sites[-1] if self.sites and self.refused is None else None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None or self.end_s is None else self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s


@dataclass
class GroupRow:
    name: str
    requests: int
    served: int
    refused: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    edge_share: float  # of served requests, those served at an edge site
    slo_met: float  # of served requests, those whose TTFT met the SLO (nan without one)


@dataclass
class SiteRow:
    name: str
    kind: str
    jurisdiction: str
    hardware: str
    replicas: int
    served: int
    busy_share: float  # replica-seconds stepping over replica-seconds of the run
    cost_usd: float  # its price over the whole span, down or not


@dataclass
class LinkRow:
    access: str
    target: str
    requests: int
    up_bytes: int
    down_bytes: int


@dataclass
class FleetReport:
    span_s: float  # simulated: from 0 to the last token
    wall_s: float
    arrivals: int
    served: int
    refused: int
    refused_reasons: dict[str, int]
    failovers: int
    residency_violations: int
    output_tokens: int
    cost_usd: float  # its price over the whole span, down or not
    cost_per_million_output: float
    ttft_slo_ms: float | None
    inter_site_bytes: int  # crossed a link between two sites
    access_only_bytes: int  # served at the user's access site
    regions: list[GroupRow]
    kinds: list[GroupRow]
    sites: list[SiteRow]
    links: list[LinkRow]
    requests: list[RequestRecord] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("requests")
        return _finite(doc)


def _finite(x: Any) -> Any:
    """NaN (no data) as null, which JSON has."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# ----- the sites -----------------------------------------------------------------------------

@dataclass
class _Replica:
    engine: SimEngine
    inbox: list[_Live] = field(default_factory=list)
    step: SimStep | None = None
    unfinished: int = 0


@dataclass
class _SiteSim:
    index: int  # in events
    site: Site
    make_engine: Callable[[], SimEngine]
    state: SiteState
    replicas: list[_Replica]
    step_s: float  # the site's recent step length: what each token left of a request costs
    generation: int = 0  # bumped when the site goes down: its pending step ends are void
    down_count: int = 0  # overlapping --fail windows
    pending: set[int] = field(default_factory=set)  # requests placed here, not finished
    busy_s: float = 0.0
    served: int = 0

    def start(self) -> None:
        self.replicas = [_Replica(self.make_engine()) for _ in range(self.site.replicas)]


class SiteModels:
    """Engines of each site, sharing what (model, hardware) pairs have in common."""

    def __init__(self, hardware_file: Path | None, max_model_len: int):
        self.catalogue = load_catalogue(hardware_file)
        self.max_model_len = max_model_len
        self.models: dict[str | None, ModelSpec] = {}
        self.factories: dict[tuple[str | None, str, int], tuple[Callable[[], SimEngine], StepModel]] = {}

    def engines(self, site: Site) -> tuple[Callable[[], SimEngine], StepModel]:
        if site.hardware is None:
            raise ConfigError(f"site {site.name!r}: no 'hardware:' (a catalogue entry such as h100-sxm, l4 "
                              f"or c7i.8xlarge), which simulation needs")
        hw = self.catalogue.get(site.hardware)
        if hw is None:
            raise ConfigError(f"site {site.name!r}: hardware {site.hardware!r} is not in the catalogue; "
                              f"known: {', '.join(sorted(self.catalogue))}")
        key = (site.model, hw.name, site.max_num_seqs)
        if key not in self.factories:
            try:
                if site.model not in self.models:
                    self.models[site.model] = ModelSpec.load(site.model)
                model = self.models[site.model]
                deployment = Deployment(hw, WEIGHT_FORMAT[hw.kind], max_num_seqs=site.max_num_seqs)
                max_len = model.config.context_len(self.max_model_len)
                factory = deployment.engine_factory(model, max_len)
                self.factories[key] = (factory, deployment.step_model(model))
            except ConfigError as e:
                raise ConfigError(f"site {site.name!r} ({site.model or 'built-in model'} on {hw.name}): {e}"
                                  ) from None
        return self.factories[key]


def initial_state(step: StepModel, site: Site, prompt: int, output: int) -> tuple[SiteState, float]:
    """Prefill speed from the step model, and a first service time: the prefill, then the
    output's decode steps at half the site's batch; and that decode step's length."""
    prefill_s = step.step_seconds([Chunk(0, prompt, True)])
    batch = max(1, site.max_num_seqs // 2)
    decode_s = step.step_seconds([Chunk(prompt + output // 2, 1, True)] * batch)
    state = SiteState(prefill_tokens_per_s=prompt / prefill_s, service_s=prefill_s + output * decode_s)
    return state, decode_s


# ----- users and requests ----------------------------------------------------------------------

@dataclass(frozen=True)
class _User:
    location: Location
    home: Site
    tags: bool  # whether every request carries its home jurisdiction


def _users(fleet: Fleet, n: int, share: float, rng: random.Random) -> list[_User]:
    sites = list(fleet.sites.values())
    weights = [EDGE_HOME_WEIGHT if s.kind == "edge" else 1.0 for s in sites]
    users = []
    for home in rng.choices(sites, weights, k=n):
        km = HOME_RADIUS_KM * math.sqrt(rng.random())  # uniform over the disc
        bearing = rng.uniform(0, 2 * math.pi)
        lat = max(-89.9, min(89.9, home.location.lat + km * math.cos(bearing) / KM_PER_DEGREE))
        dlon = km * math.sin(bearing) / (KM_PER_DEGREE * max(0.01, math.cos(math.radians(lat))))
        lon = (home.location.lon + dlon + 180) % 360 - 180
        users.append(_User(Location(lat=lat, lon=lon), home, rng.random() < share))
    return users


def _arrivals(users: list[_User], options: SimOptions, rng: random.Random) -> list[_Live]:
    """Poisson arrivals over the duration, each from a random user."""
    (plo, phi), (olo, ohi) = options.prompt_len, options.output_len
    live: list[_Live] = []
    t = rng.expovariate(options.rate)
    while t < options.duration_s:
        u = rng.randrange(len(users))
        home = users[u].home
        tag = frozenset({home.jurisdiction}) if users[u].tags else None
        rec = RequestRecord(len(live), u, home.name, home.jurisdiction, tag, rng.randint(plo, phi),
                            rng.randint(olo, ohi), t)
        live.append(_Live(rec, users[u].location))
        t += rng.expovariate(options.rate)
    return live


@dataclass(slots=True)
class _Live:
    """A request while the loop runs: its record plus where it is now."""

    rec: RequestRecord
    location: Location
    attempt: int = 0  # bumped at each placement: a delivery of an older one is void
    emitted: int = 0  # output tokens streamed so far, over all attempts
    rtt_s: float = 0.0
    link: tuple[str, str] = ("", "")  # (access site, target) of the current attempt
    first_emit_s: float | None = None  # this attempt's first token, at the site
    delivered_s: float = 0.0  # when this attempt reached its site
    free_slot: bool = False  # whether the site had a slot free when this attempt was placed

    def prompt_ids(self) -> list[int]:
        """Distinct ids per request (no prefix sharing); a resumed request's prompt carries the
        tokens already streamed."""
        base = self.rec.index << 24
        return list(range(base, base + self.rec.prompt_tokens + self.emitted))


# ----- the event loop --------------------------------------------------------------------------

ARRIVE, DELIVER, STEP_END, POLL, DOWN, UP = range(6)


class _FleetSim:
    """The sites, the requests and the event heap; events are (time, order, kind, a, b, c), a to c
    the kind's integers (a request and its attempt; a site, a replica and the site's generation)."""

    def __init__(self, fleet: Fleet, options: SimOptions):
        self.fleet = fleet
        self.options = options
        self.slo_s = options.ttft_slo_s if options.ttft_slo_s is not None else fleet.default_ttft_s
        rng = random.Random(options.seed)
        (plo, phi), (olo, ohi) = options.prompt_len, options.output_len
        models = SiteModels(options.hardware, phi + ohi)
        self.sites: dict[str, _SiteSim] = {}
        for i, site in enumerate(fleet.sites.values()):
            factory, step = models.engines(site)
            state, decode_s = initial_state(step, site, (plo + phi) // 2, (olo + ohi) // 2)
            self.sites[site.name] = _SiteSim(i, site, factory, state, [], decode_s)
        for s in self.sites.values():  # every site's model is known to fit before any engine is built
            s.start()
        self.states = {name: s.state for name, s in self.sites.items()}
        self.names = list(self.sites)
        self.live = _arrivals(_users(fleet, options.users, options.residency_share, rng), options, rng)
        self.events: list[tuple[float, int, int, int, int, int]] = []
        self.order = 0
        self.failovers = 0
        self.links: dict[tuple[str, str], list[int]] = {}  # -> [requests, up bytes, down bytes]
        for r in self.live:
            self.push(r.rec.start_s, ARRIVE, r.rec.index)
        for f in options.failures:
            i = self.names.index(f.site)
            self.push(f.down_s, DOWN, i)
            if f.up_s is not None:
                self.push(f.up_s, UP, i)

    def push(self, t: float, kind: int, a: int, b: int = 0, c: int = 0) -> None:
        heapq.heappush(self.events, (t, self.order, kind, a, b, c))
        self.order += 1

    def run(self, on_time: Callable[[float], None]) -> float:
        """Until every request is answered or refused; the span from 0 to the last token."""
        handled = 0
        while self.events:
            t, _, kind, a, b, c = heapq.heappop(self.events)
            handled += 1
            if handled % 2000 == 0:
                on_time(t)
            if kind == ARRIVE:
                self.dispatch(self.live[a], t)
            elif kind == DELIVER:
                self.deliver(self.live[a], b, t)
            elif kind == STEP_END:
                s = self.sites[self.names[a]]
                if c == s.generation:
                    self.step_end(s, b, t)
            elif kind == POLL:
                s = self.sites[self.names[a]]
                if c == s.generation:
                    self.poll(s, b, t)
            elif kind == DOWN:
                self.down(self.sites[self.names[a]], t)
            else:
                self.up(self.sites[self.names[a]], t)
        return max([r.rec.start_s if r.rec.end_s is None else r.rec.end_s for r in self.live], default=0.0)

    def dispatch(self, r: _Live, t: float) -> None:
        rec = r.rec
        demand = Demand(r.location, rec.residency, None, None, self.slo_s, rec.prompt_tokens + r.emitted)
        for s in self.sites.values():  # where a request would queue: when each slot frees
            if s.state.inflight >= s.site.capacity:
                s.state.remaining_s = tuple((self.live[i].rec.output_tokens - self.live[i].emitted) * s.step_s
                                            for i in s.pending)
        try:
            p = place(self.fleet, demand, self.states)
        except Unplaceable as e:
            rec.refused = str(e)
            return
        s = self.sites[p.site]
        r.free_slot = s.state.inflight < s.site.capacity
        r.attempt += 1
        r.rtt_s = p.route.rtt_s
        r.link = (p.route.access, p.site)
        r.first_emit_s = None
        rec.sites.append(p.site)
        s.pending.add(rec.index)
        s.state.inflight += 1
        self.link(r)[1] += UP_BYTES_PER_TOKEN * (rec.prompt_tokens + r.emitted)
        self.push(t + r.rtt_s / 2, DELIVER, rec.index, r.attempt)

    def link(self, r: _Live) -> list[int]:
        counts = self.links.get(r.link)
        if counts is None:
            counts = self.links[r.link] = [0, 0, 0]
        return counts

    def deliver(self, r: _Live, attempt: int, t: float) -> None:
        if attempt != r.attempt:  # its site went down while it was on the way
            return
        s = self.sites[r.link[1]]
        r.delivered_s = t
        k = min(range(len(s.replicas)), key=lambda i: s.replicas[i].unfinished)
        rep = s.replicas[k]
        rep.unfinished += 1
        rep.inbox.append(r)
        if rep.step is None:
            self.start_step(s, k, t)

    def start_step(self, s: _SiteSim, k: int, t: float) -> None:
        rep = s.replicas[k]
        eng = rep.engine
        eng.now = t
        for r in rep.inbox:
            eng.add_request(str(r.rec.index), r.prompt_ids(), r.rec.output_tokens - r.emitted, t)
        rep.inbox.clear()
        if not eng.has_unfinished_requests():
            return
        step = eng.launch()
        if not step.batch:
            self.push(t + IDLE_POLL_S, POLL, s.index, k, s.generation)
            return
        rep.step = step
        s.busy_s += step.seconds
        self.push(step.ends_s, STEP_END, s.index, k, s.generation)

    def poll(self, s: _SiteSim, k: int, t: float) -> None:
        if s.replicas[k].step is None:
            self.start_step(s, k, t)

    def step_end(self, s: _SiteSim, k: int, t: float) -> None:
        rep = s.replicas[k]
        assert rep.step is not None
        rep.engine.now = t
        s.step_s += STEP_EMA * (rep.step.seconds - s.step_s)
        for e in rep.engine.end_step():
            r = self.live[int(e.request_id)]
            rec = r.rec
            r.emitted += 1
            self.link(r)[2] += DOWN_BYTES_PER_TOKEN
            if r.first_emit_s is None:
                r.first_emit_s = t
                if r.free_slot:  # a TTFT that waited for nothing but prefill, on the busy engine
                    rate = (rec.prompt_tokens + r.emitted - 1) / max(t - r.delivered_s, 1e-6)
                    s.state.prefill_tokens_per_s += PREFILL_EMA * (rate - s.state.prefill_tokens_per_s)
            if rec.first_token_s is None:
                rec.first_token_s = t + r.rtt_s / 2
            if e.finished:
                rec.end_s = t + r.rtt_s / 2
                self.link(r)[0] += 1
                s.pending.discard(rec.index)
                s.state.inflight -= 1
                s.served += 1
                rep.unfinished -= 1
                # The slot was held for the prefill (estimated) and the decode (observed).
                held = t - r.first_emit_s + (rec.prompt_tokens + r.emitted) / s.state.prefill_tokens_per_s
                s.state.service_s += SERVICE_EMA * (held - s.state.service_s)
        rep.step = None
        self.start_step(s, k, t)

    def down(self, s: _SiteSim, t: float) -> None:
        s.down_count += 1
        if s.down_count > 1:
            return
        s.state.healthy = False
        s.generation += 1
        for rep in s.replicas:  # the steps running now were partly done
            if rep.step is not None:
                s.busy_s -= max(0.0, rep.engine.now + rep.step.seconds - t)
        s.replicas = []
        lost = sorted(s.pending)
        s.pending.clear()
        s.state.inflight = 0
        for i in lost:
            self.failovers += 1
            self.live[i].attempt += 1  # void its delivery here, even if no other site takes it
            self.dispatch(self.live[i], t)

    def up(self, s: _SiteSim, t: float) -> None:
        s.down_count -= 1
        if s.down_count == 0:
            s.state.healthy = True
            s.start()  # empty: a restarted site has lost its cache


def simulate_fleet(fleet: Fleet, options: SimOptions, on_time: Callable[[float], None] = lambda t: None
                   ) -> FleetReport:
    """Run the fleet under `options` (see the module docstring); `on_time` hears the simulated
    clock now and then."""
    wall = time.perf_counter()
    options.check(fleet)
    sim = _FleetSim(fleet, options)
    span = sim.run(on_time)
    return _report(sim, span, time.perf_counter() - wall)


# ----- aggregation -----------------------------------------------------------------------------

def _group(name: str, recs: list[RequestRecord], fleet: Fleet, slo_s: float | None) -> GroupRow:
    served = [r for r in recs if r.end_s is not None]
    ttft = [r.ttft_s for r in served if r.ttft_s is not None]
    e2e = [r.e2e_s for r in served if r.e2e_s is not None]
    edge = sum(1 for r in served if r.site is not None and fleet.sites[r.site].kind == "edge")
    met = math.nan if slo_s is None or not served else sum(1 for x in ttft if x <= slo_s) / len(served)
    return GroupRow(name, len(recs), len(served), sum(1 for r in recs if r.refused is not None),
                    percentile(ttft, 50) * 1e3, percentile(ttft, 99) * 1e3,
                    percentile(e2e, 50) * 1e3, percentile(e2e, 99) * 1e3,
                    edge / len(served) if served else math.nan, met)


def _report(sim: _FleetSim, span: float, wall_s: float) -> FleetReport:
    fleet = sim.fleet
    recs = [r.rec for r in sim.live]
    served = [r for r in recs if r.end_s is not None]
    # Residency, checked apart from placement: every site that saw a tagged request's data.
    violations = sum(1 for r in recs if r.residency is not None
                     and any(fleet.sites[s].jurisdiction not in r.residency for s in r.sites))
    by_region: dict[str, list[RequestRecord]] = {}
    for r in recs:
        by_region.setdefault(r.home, []).append(r)
    by_kind: dict[str, list[RequestRecord]] = {}
    for r in recs:
        kind = "refused" if r.site is None else fleet.sites[r.site].kind
        by_kind.setdefault(kind, []).append(r)
    slo = sim.slo_s
    hours = span / 3600
    sites = [SiteRow(s.site.name, s.site.kind, s.site.jurisdiction, s.site.hardware or "", s.site.replicas,
                     s.served, s.busy_s / (s.site.replicas * span) if span > 0 else 0.0,
                     s.site.cost_per_hour * hours) for s in sim.sites.values()]
    links = [LinkRow(a, b, n, up, down) for (a, b), (n, up, down) in sorted(sim.links.items())]
    cost = sum(row.cost_usd for row in sites)
    output = sum(r.output_tokens for r in served)
    return FleetReport(
        span_s=span, wall_s=wall_s, arrivals=len(recs), served=len(served),
        refused=sum(1 for r in recs if r.refused is not None),
        refused_reasons=dict(Counter(r.refused for r in recs if r.refused is not None).most_common()),
        failovers=sim.failovers, residency_violations=violations, output_tokens=output, cost_usd=cost,
        cost_per_million_output=cost / output * 1e6 if output else math.nan,
        ttft_slo_ms=None if slo is None else slo * 1e3,
        inter_site_bytes=sum(x.up_bytes + x.down_bytes for x in links if x.access != x.target),
        access_only_bytes=sum(x.up_bytes + x.down_bytes for x in links if x.access == x.target),
        regions=[_group(k, v, fleet, slo) for k, v in sorted(by_region.items())],
        kinds=[_group(k, v, fleet, slo) for k, v in sorted(by_kind.items())],
        sites=sites, links=links, requests=recs)


# ----- output ----------------------------------------------------------------------------------

def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.0f}"


def _share(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0%}"


def print_report(report: FleetReport, console: Any, title: str) -> None:
    from rich.table import Table

    groups = (("users' home jurisdiction", report.regions), ("kind of site that served", report.kinds))
    for label, rows in groups:
        t = Table(title=f"{title}: by {label}", title_justify="left")
        for col in ("", "requests", "served", "refused", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms",
                    "E2E p99 ms", "at edge", "TTFT in SLO"):
            t.add_column(col, justify="left" if not col else "right")
        for g in rows:
            t.add_row(g.name, str(g.requests), str(g.served), str(g.refused), _ms(g.ttft_p50_ms),
                      _ms(g.ttft_p99_ms), _ms(g.e2e_p50_ms), _ms(g.e2e_p99_ms), _share(g.edge_share),
                      _share(g.slo_met))
        console.print(t)
    t = Table(title=f"{title}: by site", title_justify="left")
    for col in ("site", "kind", "jurisdiction", "hardware", "replicas", "served", "busy", "cost USD"):
        t.add_column(col, justify="right" if col in ("replicas", "served", "busy", "cost USD") else "left")
    for s in report.sites:
        t.add_row(s.name, s.kind, s.jurisdiction, s.hardware, str(s.replicas), str(s.served),
                  _share(s.busy_share), f"{s.cost_usd:.2f}")
    console.print(t)
    t = Table(title=f"{title}: totals", title_justify="left", show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    slo = "-" if report.ttft_slo_ms is None else f"{report.ttft_slo_ms:g} ms"
    for k, v in (("requests", f"{report.arrivals:,}"), ("served", f"{report.served:,}"),
                 ("refused (503)", f"{report.refused:,}"), ("failovers", f"{report.failovers:,}"),
                 ("residency violations", str(report.residency_violations)), ("TTFT SLO", slo),
                 ("simulated span", f"{report.span_s:.1f} s"), ("output tokens", f"{report.output_tokens:,}"),
                 ("cost", f"{report.cost_usd:.2f} USD"),
                 ("cost per 1M output tokens", f"{report.cost_per_million_output:.2f} USD"),
                 ("bytes over inter-site links", fmt_bytes(report.inter_site_bytes)),
                 ("bytes served at the access site", fmt_bytes(report.access_only_bytes)),
                 ("wall time", f"{report.wall_s:.1f} s")):
        t.add_row(k, v)
    console.print(t)
    for reason, n in report.refused_reasons.items():
        console.print(f"refused {n}x: {reason}", markup=False, highlight=False)
    crossing = sorted((x for x in report.links if x.access != x.target),
                      key=lambda x: x.up_bytes + x.down_bytes, reverse=True)[:10]
    if crossing:
        t = Table(title=f"{title}: busiest inter-site links", title_justify="left")
        for col in ("access site", "target", "requests", "up", "down"):
            t.add_column(col, justify="left" if col in ("access site", "target") else "right")
        for x in crossing:
            t.add_row(x.access, x.target, str(x.requests), fmt_bytes(x.up_bytes), fmt_bytes(x.down_bytes))
        console.print(t)


def plot_report(report: FleetReport, path: Path) -> Path:
    """TTFT and E2E p50/p99 by home jurisdiction, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.regions
    xs = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.7 * len(rows) + 4), 4.5))
    for ax, what in zip(axes, ("ttft", "e2e"), strict=True):
        for j, q in enumerate((50, 99)):
            values = [getattr(g, f"{what}_p{q}_ms") for g in rows]
            ax.bar([x + (j - 0.5) * 0.4 for x in xs], [math.nan if v <= 0 else v for v in values], 0.4,
                   label=f"p{q}", color=f"C{j}")
        if what == "ttft" and report.ttft_slo_ms is not None:
            ax.axhline(report.ttft_slo_ms, color="red", ls=":", lw=0.8, label="TTFT SLO")
        ax.set_xticks(list(xs), [g.name for g in rows], rotation=45 if len(rows) > 8 else 0)
        ax.set_yscale("log")  # p50 and p99 lie orders of magnitude apart
        ax.set_ylabel(f"{what.upper()} (ms)")
        ax.set_title(f"{what.upper()} by users' home jurisdiction", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- command line ----------------------------------------------------------------------------

def add_simulate_args(parser: argparse.ArgumentParser) -> None:
    defaults = SimOptions()
    parser.add_argument("--sites", type=Path, required=True, metavar="FILE",
                        help="the fleet's sites file; every site needs 'hardware:' (a catalogue entry)")
    parser.add_argument("--users", type=int, default=defaults.users, metavar="N",
                        help="users, each homed at a site and within 150 km of it (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=defaults.rate, metavar="R",
                        help="requests/s from all users together, Poisson (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, metavar="S",
                        help="seconds of arrivals; the run goes on until all are answered "
                             "(default: %(default)s)")
    parser.add_argument("--prompt-len", default="512", metavar="N|LO:HI",
                        help="prompt tokens: fixed, or uniform over LO..HI (default: %(default)s)")
    parser.add_argument("--output-len", default="128", metavar="N|LO:HI",
                        help="output tokens: fixed, or uniform over LO..HI (default: %(default)s)")
    parser.add_argument("--residency-share", type=float, default=defaults.residency_share, metavar="F",
                        help="fraction of users whose requests must stay in their home jurisdiction "
                             "(default: %(default)s)")
    parser.add_argument("--ttft-ms", type=float, default=None, metavar="MS",
                        help="requests' TTFT SLO, which placement aims for (default: the fleet's ttft_ms)")
    parser.add_argument("--fail", action="append", default=[], metavar="SITE@T[-T2]",
                        help="SITE goes down at simulated second T (back, empty, at T2); repeatable")
    parser.add_argument("--hardware", type=Path, default=None, metavar="FILE",
                        help="a hardware catalogue whose entries replace or extend the shipped ones")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write results.json and ttft.png here")


def options_from_args(args: argparse.Namespace) -> SimOptions:
    if args.ttft_ms is not None and not args.ttft_ms > 0:
        raise ConfigError(f"--ttft-ms must be positive, got {args.ttft_ms}")
    return SimOptions(users=args.users, rate=args.rate, duration_s=args.duration,
                      prompt_len=parse_len(args.prompt_len, "--prompt-len"),
                      output_len=parse_len(args.output_len, "--output-len"),
                      residency_share=args.residency_share,
                      ttft_slo_s=None if args.ttft_ms is None else args.ttft_ms / 1e3,
                      failures=tuple(Failure.parse(f) for f in args.fail), hardware=args.hardware,
                      seed=args.seed)


def cmd_simulate(args: argparse.Namespace) -> None:
    """`llmscale edge simulate` (ConfigError: a one-line problem with the flags or the files)."""
    options = options_from_args(args)
    fleet = load_fleet(args.sites)
    with _Progress(options.duration_s, args.quiet) as on_time:
        report = simulate_fleet(fleet, options, on_time)
    console = stdout_console()
    title = (f"{len(fleet.sites)} sites, {options.users:,} users, {options.rate:g} req/s for "
             f"{options.duration_s:g} s")
    print_report(report, console, title)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"sites_file": str(args.sites), "options": _finite(asdict(options)), **report.to_json()}
        (args.out / "results.json").write_text(json.dumps(doc, indent=1, default=str, allow_nan=False))
        png = plot_report(report, args.out / "ttft.png")
        console.print(f"wrote {args.out / 'results.json'} and {png}", markup=False, highlight=False)


class _Progress:
    """Simulated seconds on stderr, none with -q: a bar on a terminal, else a line per tenth of the
    arrivals (a log stays readable). After the arrivals the run drains what is still in flight."""

    def __init__(self, duration_s: float, quiet: bool):
        from rich import get_console
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.duration_s = duration_s
        self.quiet = quiet or get_console().quiet
        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed:.0f}/{task.total:.0f} s simulated"),
                            TimeElapsedColumn(), console=self.console, transient=True)
        self.task = self.bar.add_task("arrivals", total=duration_s)
        self.tenths = 0

    def __enter__(self) -> Callable[[float], None]:
        if self.quiet:
            return lambda t: None
        if self.console.is_terminal:
            self.bar.__enter__()
            return lambda t: self.bar.update(self.task, completed=min(t, self.duration_s),
                                             description="arrivals" if t < self.duration_s else "draining")
        return self.line

    def line(self, t: float) -> None:
        tenths = min(10, int(10 * t / self.duration_s))
        if tenths > self.tenths:
            self.tenths = tenths
            what = "arrivals over; draining" if tenths == 10 else "simulating"
            print(f"{what}: {min(t, self.duration_s):.0f}/{self.duration_s:g} s", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if not self.quiet and self.console.is_terminal:
            self.bar.__exit__(*exc)
