"""Placement: which site of the fleet takes a request.

Hard constraints first, each one a filter that can only remove sites:
1. residency: a request tagged with jurisdictions goes only to sites in one of them;
2. model: a request naming a model goes only to sites serving it (the fleet's own name, or
   none, means any); a site kind (`edge`/`cloud`) when the request asks for one;
3. reachable: the site is healthy and the link from the user's access site to it is up.
If that leaves nothing, the request is refused with `Unplaceable`, whose message names the
constraint that emptied the set and the sites it left: never a silent fallback elsewhere.

Then latency: a site is feasible when its predicted TTFT (network round trip from the user +
queueing behind the requests already there + prefill) is within the request's SLO. Among
those the cheapest replica-hour wins, ties to the nearer site (the shorter round trip: a
stable signal, where predicted queueing and prefill move with every answer), so nearer sites
win within their capacity. Where no site meets the SLO, the fastest allowed one takes it.

Pure functions of the fleet, the demand and each site's live state: the gateway, the
simulator and the property tests all call the same `place`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llmscale.cluster.sites import Fleet, Location, Route, Site


class Unplaceable(Exception):
    """No site may take the request; the message (one line) says which constraint and why."""


@dataclass(frozen=True)
class Demand:
    """What one request asks of placement."""

    user: Location | None = None
    residency: frozenset[str] | None = None  # allowed jurisdictions; None: anywhere
    model: str | None = None  # a served model's name; None: any
    kind: str | None = None  # "edge" | "cloud"; None: either
    ttft_slo_s: float | None = None
    prompt_tokens: int = 0


@dataclass
class SiteState:
    """A site as the placer sees it now."""

    healthy: bool = True
    inflight: int = 0  # requests sent and not finished
    model_name: str | None = None  # what it serves, once known
    prefill_tokens_per_s: float = 2000.0  # from the performance model, or learned from its answers
    service_s: float = 1.0  # how long a request holds one of its slots, recently
    remaining_s: tuple[float, ...] = ()  # when known: how long each request in flight has left
    down_links: frozenset[str] = frozenset()  # access sites whose link to this site is cut


@dataclass(frozen=True)
class Placement:
    site: str
    predicted_ttft_s: float
    meets_slo: bool
    route: Route


def queue_seconds(site: Site, state: SiteState) -> float:
    """The wait of one more request: none while a slot is free; else until the slot it will
    take frees, which is when the `ahead`-th of the requests there ends (slots that filled
    together free together), or without their remaining times, one service time per full
    round of the site's slots ahead of it."""
    ahead = state.inflight - site.capacity + 1
    if ahead <= 0:
        return 0.0
    if len(state.remaining_s) >= ahead:
        return sorted(state.remaining_s)[ahead - 1]
    return ahead / site.capacity * state.service_s


def predicted_ttft(site: Site, state: SiteState, route: Route, prompt_tokens: int) -> float:
    return route.rtt_s + queue_seconds(site, state) + prompt_tokens / state.prefill_tokens_per_s


def place(fleet: Fleet, demand: Demand, states: Mapping[str, SiteState], fleet_model: str | None = None
          ) -> Placement:
    """The site for `demand` (see the module docstring); `Unplaceable` when none may take it."""
    sites = list(fleet.sites.values())
    what = "this request"
    if demand.residency is not None:
        codes = "/".join(sorted(demand.residency))
        sites = [s for s in sites if s.jurisdiction in demand.residency]
        what = f"residency {codes} (x-llmscale-residency)"
        if not sites:
            raise Unplaceable(f"no site is in jurisdiction {codes} (x-llmscale-residency); the fleet has "
                              f"{', '.join(sorted({s.jurisdiction for s in fleet.sites.values()}))}")
    if demand.model is not None and demand.model != fleet_model:
        sites = [s for s in sites if states[s.name].model_name == demand.model]
        what += f", model {demand.model!r}"
        if not sites:
            raise Unplaceable(f"no site allowed by {what} serves it")
    if demand.kind is not None:
        sites = [s for s in sites if s.kind == demand.kind]
        what += f", {demand.kind} sites only"
        if not sites:
            raise Unplaceable(f"no {demand.kind} site is allowed by {what}")
    routes = fleet.routes(demand.user, [s.name for s in sites])
    up = [s for s in sites
          if states[s.name].healthy and routes[s.name].access not in states[s.name].down_links]
    if not up:
        names = ", ".join(s.name for s in sites)
        raise Unplaceable(f"every site allowed by {what} is down or cut off ({names})")
    scored = [(s, predicted_ttft(s, states[s.name], routes[s.name], demand.prompt_tokens)) for s in up]
    slo = demand.ttft_slo_s if demand.ttft_slo_s is not None else fleet.default_ttft_s
    feasible = [(s, t) for s, t in scored if slo is None or t <= slo]
    if feasible:
        site, ttft = min(feasible, key=lambda st: (st[0].replica_cost_per_hour, routes[st[0].name].rtt_s,
                                                   st[1], st[0].name))
        return Placement(site.name, ttft, True, routes[site.name])
    site, ttft = min(scored, key=lambda st: (st[1], st[0].replica_cost_per_hour, st[0].name))
    return Placement(site.name, ttft, False, routes[site.name])
