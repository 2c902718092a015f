"""The fleet of an edge/cloud deployment: its sites file, and the network between them.

A sites file (YAML) lists `sites:`, each a whole llmscale deployment somewhere: an edge site
(small, quantized or distilled model, near its users) or a cloud site (bigger model, more
capacity), with where it is, which law governs the data it sees (`jurisdiction`), how many
requests it runs at once (`replicas` x `max_num_seqs`), what a replica-hour costs, and either
`start: local` (llmscale starts it here) or `url:` (an OpenAI-compatible server already up).

The network: a user reaches the fleet at the site nearest to them (their access site, a PoP
or the edge box on their premises); going on to another site crosses the link between the
two. A link's RTT is derived from the great-circle distance, light in fibre covering
`km_per_ms` one way, plus a router overhead per hop, one hop per `km_per_hop`; `links:` in the
file override RTT, bandwidth or loss per pair. Every problem with the file is one ConfigError
line naming the entry and field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmscale.config import ConfigError, parse_yaml, read_user_file

EARTH_RADIUS_KM = 6371.0
JURISDICTION_RE = re.compile(r"^[A-Z][A-Z0-9-]{1,15}$")  # ISO 3166 codes, or a region such as EU
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class Location(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)

    @classmethod
    def parse(cls, text: str) -> Location:
        """'48.1,11.6' -> a Location; ValueError with a one-line reason."""
        parts = text.split(",")
        if len(parts) != 2:
            raise ValueError(f"expected 'lat,lon', got {text!r}")
        try:
            lat, lon = (float(p) for p in parts)
            return cls(lat=lat, lon=lon)
        except (ValueError, ValidationError):
            raise ValueError(f"expected 'lat,lon' in degrees (lat -90..90, lon -180..180), "
                             f"got {text!r}") from None


def great_circle_km(a: Location, b: Location) -> float:
    """Haversine distance over a spherical Earth."""
    p1, p2 = math.radians(a.lat), math.radians(b.lat)
    dp, dl = p2 - p1, math.radians(b.lon - a.lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


class NetworkSpec(BaseModel):
    """How links are derived where the file does not give them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    km_per_ms: float = Field(200.0, gt=0)  # light in fibre, one way
    hop_ms: float = Field(1.0, ge=0)  # per router hop, round trip
    km_per_hop: float = Field(1000.0, gt=0)  # one more hop per this many km; a link has at least one
    bandwidth_mbps: float = Field(1000.0, gt=0)
    loss: float = Field(0.0, ge=0, lt=1)


class LinkSpec(BaseModel):
    """`links:` entry: what one pair of sites really has."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    between: tuple[str, str]
    rtt_ms: float | None = Field(None, ge=0)
    bandwidth_mbps: float | None = Field(None, gt=0)
    loss: float | None = Field(None, ge=0, lt=1)


class Site(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: Literal["edge", "cloud"]
    location: Location
    jurisdiction: str
    replicas: int = Field(1, ge=1)
    max_num_seqs: int = Field(8, ge=1)  # requests one replica runs at once
    model: str | None = None  # as for --model (None: the built-in model); only for start: local
    cost_per_hour: float = Field(ge=0)  # USD for the whole site
    start: Literal["local"] | None = None
    url: str | None = None
    engine_args: tuple[str, ...] = ()  # more `llmscale serve` flags for a local site
    hardware: str | None = None  # a catalogue entry (`plan/hardware.yaml`) for the performance model

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("lowercase letters, digits, '.', '_' or '-'")
        return v

    @field_validator("jurisdiction")
    @classmethod
    def _jurisdiction(cls, v: str) -> str:
        v = v.strip().upper()
        if not JURISDICTION_RE.match(v):
            raise ValueError(f"a country or region code such as DE or EU, got {v!r}")
        return v

    @model_validator(mode="after")
    def _where(self) -> Site:
        if (self.start is None) == (self.url is None):
            raise ValueError("give exactly one of 'start: local' and 'url:'")
        if self.url is not None and not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError(f"url must be http(s)://host:port, got {self.url!r}")
        if self.url is not None and self.engine_args:
            raise ValueError("engine_args are for 'start: local' sites")
        return self

    @property
    def capacity(self) -> int:
        """Requests the site runs at once; beyond, they queue."""
        return self.replicas * self.max_num_seqs

    @property
    def replica_cost_per_hour(self) -> float:
        return self.cost_per_hour / self.replicas


class FleetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sites: tuple[Site, ...] = Field(min_length=1)
    links: tuple[LinkSpec, ...] = ()
    network: NetworkSpec = NetworkSpec()
    ttft_ms: float | None = Field(None, gt=0)  # the SLO of requests that name none

    @model_validator(mode="after")
    def _names(self) -> FleetSpec:
        names = [s.name for s in self.sites]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two sites are named {name!r}")
        for link in self.links:
            for end in link.between:
                if end not in names:
                    raise ValueError(f"links: {end!r} is not a site; sites: {', '.join(names)}")
        return self


@dataclass(frozen=True)
class Link:
    rtt_s: float
    bandwidth_bps: float  # bytes per second
    loss: float


@dataclass(frozen=True)
class Route:
    """How a user's request reaches a site: the access leg to the nearest site, then the link
    from there (none when the access site is the target)."""

    access: str  # the access site's name
    rtt_s: float  # both legs
    access_rtt_s: float
    link: Link  # access site -> target


class Fleet:
    """The sites and the network between them (read-only once loaded)."""

    def __init__(self, spec: FleetSpec, source: str = "sites file"):
        self.spec = spec
        self.source = source
        self.sites: dict[str, Site] = {s.name: s for s in spec.sites}
        self.net = spec.network
        given = {frozenset(link.between): link for link in spec.links}
        # Every pair's link, worked out once: placement asks for each candidate on every request.
        self.links = {(a, b): self._link(a, b, given.get(frozenset((a, b))))
                      for a in self.sites for b in self.sites}

    @property
    def default_ttft_s(self) -> float | None:
        return None if self.spec.ttft_ms is None else self.spec.ttft_ms / 1e3

    def derived(self, km: float) -> Link:
        hops = 1 + math.floor(km / self.net.km_per_hop)
        rtt_ms = 2 * km / self.net.km_per_ms + hops * self.net.hop_ms
        return Link(rtt_ms / 1e3, self.net.bandwidth_mbps * 125_000, self.net.loss)

    def link(self, a: str, b: str) -> Link:
        """The link between two sites (a site's own link when a == b: its uplink, one hop)."""
        return self.links[a, b]

    def _link(self, a: str, b: str, spec: LinkSpec | None) -> Link:
        """Derived from the distance, with what `links:` gives for the pair."""
        link = self.derived(great_circle_km(self.sites[a].location, self.sites[b].location))
        if spec is None:
            return link
        return Link(link.rtt_s if spec.rtt_ms is None else spec.rtt_ms / 1e3,
                    link.bandwidth_bps if spec.bandwidth_mbps is None else spec.bandwidth_mbps * 125_000,
                    link.loss if spec.loss is None else spec.loss)

    def access_site(self, user: Location) -> str:
        return min(self.sites.values(), key=lambda s: (great_circle_km(user, s.location), s.name)).name

    def route(self, user: Location | None, site: str) -> Route:
        """A user at `user` (None: unknown, taken as at the site) to `site`."""
        return self.routes(user, [site])[site]

    def routes(self, user: Location | None, sites: list[str]) -> dict[str, Route]:
        """A user's route to each of `sites`, their access site found once."""
        if user is None:
            return {s: Route(s, 0.0, 0.0, self.links[s, s]) for s in sites}
        access = self.access_site(user)
        access_rtt = self.derived(great_circle_km(user, self.sites[access].location)).rtt_s
        out = {}
        for s in sites:
            link = self.links[access, s]
            out[s] = Route(access, access_rtt + (0.0 if access == s else link.rtt_s), access_rtt, link)
        return out


def parse_fleet(text: str, source: str) -> Fleet:
    raw = parse_yaml(text, source)
    if not isinstance(raw, dict) or "sites" not in raw:
        raise ConfigError(f"{source}: expected a top-level 'sites:' list")
    try:
        return Fleet(FleetSpec.model_validate(raw), source)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_one_line(e, raw)}") from None


def load_fleet(path: str | Path) -> Fleet:
    return parse_fleet(read_user_file(path, "sites file"), str(path))


def _one_line(e: ValidationError, raw: dict[str, Any]) -> str:
    """The first problem, placed as `sites[2] 'edge-de', field location.lat: ...`."""
    err = e.errors()[0]
    loc = list(err["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] in ("sites", "links") and isinstance(loc[1], int):
        where = f"{loc[0]}[{loc[1]}]"
        entries = raw.get(loc[0])
        if loc[0] == "sites" and isinstance(entries, list) and loc[1] < len(entries):
            entry = entries[loc[1]]
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                where += f" {entry['name']!r}"
        loc = loc[2:]
    field = ".".join(str(x) for x in loc)
    if field:
        where = f"{where}, field {field!r}" if where else f"field {field!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
