"""`llmscale edge serve`: one OpenAI-compatible entry point in front of a fleet of sites.

Each request is placed (cluster/placement.py) from what it carries (`x-llmscale-residency`,
`x-llmscale-user-location`, `x-llmscale-ttft-ms`, `x-llmscale-site-kind`, its `model`, its size)
and every site's live state, then forwarded to one of that site's replicas and streamed back
with `x-llmscale-site`. A site that cannot be reached before it answers is taken out and the
request goes to the next site placement allows; one lost mid-stream ends with an error event.

Live state: requests in flight per site and replica (counted here), how long a request holds
a slot and how fast the site prefills (moving averages of its answers, seeded by the
performance model when the site names its hardware), and health: every replica's /health is
polled through the site's own link, two misses take it out, one answer puts it back.

With link emulation (the default) every path a request can take, access site -> site, goes
through its own `LinkProxy` on a proxy thread: the link's delay, bandwidth and loss, its byte
counts, and a switch that cuts it. The user's leg to the access site is added here, before
the request leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmscale.cluster.netem import LinkProxy, ProxyThread
from llmscale.cluster.placement import Demand, Placement, SiteState, Unplaceable, place
from llmscale.cluster.site_process import LocalSite
from llmscale.cluster.sites import JURISDICTION_RE, Fleet, Location, Site
from llmscale.config import ConfigError
from llmscale.console import status
from llmscale.serve.app import LimitBody, RequireApiKey, error_response, sse_error

SITE_HEADER = "x-llmscale-site"
HEALTH_INTERVAL_S = 0.5
HEALTH_TIMEOUT_S = 1.0
DOWN_AFTER_MISSES = 2  # consecutive missed health checks that take a replica out
LINK_RETRY_S = 5.0  # a link that refused a request is avoided this long, then tried again
AVERAGING = 0.2  # weight of the newest answer in the moving averages
DEFAULT_MAX_TOKENS = 256  # what placement assumes a request without max_tokens generates
TYPICAL_PROMPT, TYPICAL_OUTPUT = 512, 128  # the request a site's first estimates are made for
BYTES_PER_TOKEN = 4  # what placement assumes a prompt's text costs in tokens
EVENTS_KEPT = 500
# The gateway's own path to a site (health checks, rollout probes): the site's own link, cut
# with it, and left out of the traffic counts.
CONTROL = "(control)"
ROUTES = ("/v1/completions", "/v1/chat/completions")


class BadRequest(Exception):
    """A request header or body placement cannot read: 400 with this message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Replica:
    url: str  # as reached directly
    healthy: bool = False
    misses: int = 0
    inflight: int = 0


@dataclass
class SiteRuntime:
    """One site as the gateway runs it."""

    site: Site
    replicas: list[Replica]
    local: LocalSite | None
    state: SiteState = field(default_factory=lambda: SiteState(healthy=False))
    links: dict[str, list[LinkProxy]] = field(default_factory=dict)  # access site -> one per replica
    link_avoided_until: dict[str, float] = field(default_factory=dict)
    updating: bool = False  # a rollout has it out of rotation
    tokens_left: dict[int, int] = field(default_factory=dict)  # request in flight -> tokens it has to go
    tpot_s: float = 0.05  # time per output token, recently
    served: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def endpoint(self, access: str, i: int) -> str:
        """Replica `i` as reached from `access`: through the link's proxy when emulated."""
        proxies = self.links.get(access)
        return f"http://{proxies[i].address}" if proxies else self.replicas[i].url

    def refresh(self, now: float) -> SiteState:
        s = self.state
        s.healthy = not self.updating and any(r.healthy for r in self.replicas)
        s.inflight = sum(r.inflight for r in self.replicas)
        s.down_links = frozenset(a for a, until in self.link_avoided_until.items() if until > now)
        s.remaining_s = tuple(left * self.tpot_s for left in self.tokens_left.values())
        return s


def read_demand(headers: Any, body: dict[str, Any]) -> Demand:
    """The request's placement demand; BadRequest for a header or body it cannot read."""
    residency = None
    if raw := headers.get("x-llmscale-residency"):
        codes = {c.strip().upper() for c in raw.split(",") if c.strip()}
        bad = [c for c in codes if not JURISDICTION_RE.match(c)]
        if not codes or bad:
            raise BadRequest(f"x-llmscale-residency: expected jurisdiction codes such as DE or DE,FR, "
                             f"got {raw!r}")
        residency = frozenset(codes)
    user = None
    if raw := headers.get("x-llmscale-user-location"):
        try:
            user = Location.parse(raw)
        except ValueError as e:
            raise BadRequest(f"x-llmscale-user-location: {e}") from None
    slo = None
    if raw := headers.get("x-llmscale-ttft-ms"):
        try:
            slo = float(raw) / 1e3
        except ValueError:
            slo = -1.0
        if not 0 < slo < float("inf"):
            raise BadRequest(f"x-llmscale-ttft-ms: expected a positive number of milliseconds, got {raw!r}")
    kind = headers.get("x-llmscale-site-kind")
    if kind is not None and kind not in ("edge", "cloud"):
        raise BadRequest(f"x-llmscale-site-kind: expected edge or cloud, got {kind!r}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    return Demand(user, residency, model, kind, slo, max(1, len(_prompt_text(body)) // BYTES_PER_TOKEN))


def _prompt_text(body: dict[str, Any]) -> str:
    """The text a request prefills, as far as placement needs it (its size)."""
    if "messages" in body and isinstance(body["messages"], list):
        return "".join(json.dumps(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


class Gateway:
    def __init__(self, fleet: Fleet, *, emulate_links: bool = True, served_model_name: str = "llmscale-edge",
                 log_dir: Path, start_timeout_s: float = 300.0, seed: int = 0,
                 hardware_file: Path | None = None) -> None:
        self.fleet = fleet
        self.emulate_links = emulate_links
        self.served_model_name = served_model_name
        self.log_dir = log_dir
        self.start_timeout_s = start_timeout_s
        self.seed = seed
        self.hardware_file = hardware_file
        self.sites: dict[str, SiteRuntime] = {}
        self.proxies: ProxyThread | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.rollout: Any = None  # the last rollout (cluster/rollout.py), for /edge/status
        self.client: httpx.AsyncClient | None = None
        self.started = time.time()
        self.request_ids = itertools.count()

    # ----- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the local sites (without waiting for them) and the links."""
        for site in self.fleet.sites.values():  # every model checked before any process starts
            if site.start == "local" and site.model is not None and not Path(site.model).exists():
                raise ConfigError(f"{self.fleet.source}: site {site.name!r}: model {site.model!r} is not a "
                                  f"model folder or .gguf on this machine (architecture names such as "
                                  f"llama-3.1-8b are for `llmscale edge simulate`)")
        priors = self._performance_priors()
        for site in self.fleet.sites.values():
            if site.start == "local":
                local = LocalSite(site, self.log_dir)
                local.start(site.model)
                replicas = [Replica(u) for u in local.urls()]
                what = site.model or "the built-in model"
                self.note(f"{site.name}: starting {site.replicas} replica(s) of {what}")
            else:
                local, replicas = None, [Replica(str(site.url).rstrip("/"))]
            rt = self.sites[site.name] = SiteRuntime(site, replicas, local)
            if site.name in priors:
                prior, rt.tpot_s = priors[site.name]
                rt.state.prefill_tokens_per_s = prior.prefill_tokens_per_s
                rt.state.service_s = prior.service_s
        if self.emulate_links:
            self.proxies = ProxyThread()
            for name, rt in self.sites.items():
                for access in [*self.sites, CONTROL]:
                    link = self.fleet.link(name if access == CONTROL else access, name)
                    rt.links[access] = [
                        self.proxies.add(port, target_host=host, delay_s=link.rtt_s / 2,
                                         bandwidth_bps=link.bandwidth_bps, loss=link.loss,
                                         seed=zlib.crc32(f"{self.seed} {access} {name} {i}".encode()))
                        for i, (host, port) in enumerate(_host_port(r.url) for r in rt.replicas)]

    def _performance_priors(self) -> dict[str, tuple[SiteState, float]]:
        """For sites that name their hardware, the performance model's prefill speed, service
        time and step length for a typical request: where they start, instead of generic guesses."""
        named = [s for s in self.fleet.sites.values() if s.hardware is not None]
        if not named:
            return {}
        from llmscale.cluster.edge_sim import SiteModels, initial_state

        models = SiteModels(self.hardware_file, TYPICAL_PROMPT + TYPICAL_OUTPUT)
        return {s.name: initial_state(models.engines(s)[1], s, TYPICAL_PROMPT, TYPICAL_OUTPUT) for s in named}

    @contextlib.asynccontextmanager
    async def running(self, _: FastAPI) -> AsyncIterator[None]:
        """The app's lifespan: the forwarding client and the health checks."""
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=2.0), trust_env=False,
                                        limits=limits)
        checks = asyncio.create_task(self.health_loop())
        try:
            yield
        finally:
            checks.cancel()
            await self.client.aclose()

    def close(self) -> None:
        for rt in self.sites.values():
            if rt.local is not None:
                rt.local.stop()
        if self.proxies is not None:
            self.proxies.close()

    def note(self, message: str) -> None:
        self.events.append({"t": round(time.time() - self.started, 3), "message": message})
        status(message)

    # ----- health ---------------------------------------------------------------------------

    async def health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(rt) for rt in self.sites.values()))
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def check(self, rt: SiteRuntime) -> None:
        assert self.client is not None
        was = any(r.healthy for r in rt.replicas)
        for i, rep in enumerate(rt.replicas):
            url = rt.endpoint(CONTROL, i)
            try:
                r = await self.client.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S)
                ok = r.status_code == 200
                if ok and rt.state.model_name is None:
                    models = await self.client.get(f"{url}/v1/models", timeout=HEALTH_TIMEOUT_S)
                    rt.state.model_name = models.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                ok = False
            if ok:
                rep.healthy, rep.misses = True, 0
            else:
                rep.misses += 1
                rep.healthy = rep.healthy and rep.misses < DOWN_AFTER_MISSES
        now_up = any(r.healthy for r in rt.replicas)
        if now_up != was and not rt.updating:
            self.note(f"{rt.site.name}: {'healthy' if now_up else 'down'}")

    def states(self) -> dict[str, SiteState]:
        now = time.monotonic()
        return {name: rt.refresh(now) for name, rt in self.sites.items()}

    # ----- requests -------------------------------------------------------------------------

    async def forward(self, path: str, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object")
        try:
            demand = read_demand(request.headers, body)
        except BadRequest as e:
            return error_response(400, str(e), param=e.param)
        stream = body.get("stream") is True
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
        max_tokens = max_tokens if isinstance(max_tokens, int) else DEFAULT_MAX_TOKENS
        tried: set[str] = set()
        while True:
            # A site that failed this request is not asked again (the sites' own states stay as they are).
            states = {name: replace(st, healthy=False) if name in tried else st
                      for name, st in self.states().items()}
            try:
                placement = place(self.fleet, demand, states, self.served_model_name)
            except Unplaceable as e:
                code = "no_feasible_site" if not tried else "sites_failed"
                return error_response(503, str(e), "service_unavailable", code=code)
            site_model = states[placement.site].model_name
            if demand.model in (None, self.served_model_name) and site_model is not None:
                raw = json.dumps({**body, "model": site_model}).encode()  # the fleet's name: the site's model
            response = await self._try(placement, path, raw, demand, stream, max_tokens)
            if response is not None:
                return response
            tried.add(placement.site)

    async def _try(self, placement: Placement, path: str, raw: bytes, demand: Demand, stream: bool,
                   max_tokens: int) -> Response | None:
        """Send to the placed site; None when it could not be reached (the caller places again)."""
        assert self.client is not None
        rt = self.sites[placement.site]
        access = placement.route.access
        live = [i for i, r in enumerate(rt.replicas) if r.healthy] or list(range(len(rt.replicas)))
        i = min(live, key=lambda k: rt.replicas[k].inflight)
        rep = rt.replicas[i]
        had_free_slot = rt.state.inflight < rt.site.capacity
        if self.emulate_links and placement.route.access_rtt_s:
            await asyncio.sleep(placement.route.access_rtt_s)  # the user's own leg, both ways
        key = next(self.request_ids)
        sent = time.monotonic()
        rep.inflight += 1
        rt.tokens_left[key] = max_tokens

        def done() -> None:
            rep.inflight -= 1
            rt.tokens_left.pop(key, None)

        try:
            req = self.client.build_request("POST", rt.endpoint(access, i) + path, content=raw,
                                            headers={"content-type": "application/json"})
            upstream = await self.client.send(req, stream=True)
        except httpx.HTTPError as e:
            done()
            self._unreachable(rt, access, e)
            return None
        if upstream.status_code >= 500:  # the site cannot take it (draining, dead engine): next site
            await upstream.aclose()
            done()
            rt.failed += 1
            self.note(f"{rt.site.name}: answered {upstream.status_code}; placing the request again")
            return None
        # Wait for the first bytes before answering: until then the request can still go elsewhere
        # (a site cut off after taking it, or dying with it queued), and the client sees nothing.
        chunks = upstream.aiter_raw()
        try:
            first_chunk = await anext(chunks, b"")
        except httpx.HTTPError as e:
            await upstream.aclose()
            done()
            self._unreachable(rt, access, e)
            return None
        first_at = time.monotonic()
        rt.bytes_in += len(raw)
        headers = {SITE_HEADER: rt.site.name,
                   "x-llmscale-predicted-ttft-ms": f"{placement.predicted_ttft_s * 1e3:.1f}",
                   "x-llmscale-slo": "met" if placement.meets_slo else "missed"}
        media = upstream.headers.get("content-type", "application/json")
        link_rtt = self.fleet.link(access, rt.site.name).rtt_s if self.emulate_links else 0.0
        learn = stream and upstream.status_code == 200
        if learn:
            self._learn_prefill(rt, demand, first_at - sent - link_rtt, had_free_slot)

        async def relay() -> AsyncIterator[bytes]:
            events = 0  # SSE events: one per token, near enough
            complete = lost = False  # neither: the client left first
            try:
                async for chunk in _chained(first_chunk, chunks):
                    events += chunk.count(b"data: ")
                    complete = complete or b"data: [DONE]" in chunk  # a client may leave right after it
                    if stream and key in rt.tokens_left:
                        rt.tokens_left[key] = max(0, max_tokens - events)
                    rt.bytes_out += len(chunk)
                    yield chunk
                complete = True
            except httpx.HTTPError:
                lost = True
                self.note(f"{rt.site.name}: lost a request mid-stream")
                if stream:
                    yield sse_error(f"site {rt.site.name} was lost mid-stream").encode()
            finally:
                done()
                await upstream.aclose()
                if complete and upstream.status_code == 200:
                    rt.served += 1
                    now = time.monotonic()
                    rt.state.service_s += AVERAGING * (now - sent - rt.state.service_s)
                    if learn and events > 3:  # first token, ..., [DONE]
                        rt.tpot_s += AVERAGING * ((now - first_at) / (events - 2) - rt.tpot_s)
                elif lost:
                    rt.failed += 1

        return StreamingResponse(relay(), status_code=upstream.status_code, media_type=media, headers=headers)

    def _unreachable(self, rt: SiteRuntime, access: str, e: Exception) -> None:
        rt.failed += 1
        rt.link_avoided_until[access] = time.monotonic() + LINK_RETRY_S
        self.note(f"{rt.site.name}: unreachable from {access} ({type(e).__name__}); failing over")

    @staticmethod
    def _learn_prefill(rt: SiteRuntime, demand: Demand, ttft_s: float, had_free_slot: bool) -> None:
        """Refine the site's prefill rate from a TTFT that waited for nothing but prefill."""
        if had_free_slot and ttft_s > 0:
            s = rt.state
            s.prefill_tokens_per_s += AVERAGING * (demand.prompt_tokens / ttft_s - s.prefill_tokens_per_s)

    # ----- operations -----------------------------------------------------------------------

    def set_link(self, site: str, up: bool, access: str | None = None) -> None:
        """Cut (or restore) the links into `site`: from `access`, or from everywhere (the
        gateway's own path to it included, so its health checks fail too)."""
        if site not in self.sites or (access is not None and access not in self.sites):
            raise ConfigError(f"no site named {access if site in self.sites else site!r}; sites: "
                              f"{', '.join(self.sites)}")
        if self.proxies is None:
            raise ConfigError("links are not emulated (--no-emulate-links): nothing to cut")
        rt = self.sites[site]
        for a, proxies in rt.links.items():
            if access is None or a == access:
                for p in proxies:
                    self.proxies.call(p.set_down, not up)
        where = f"from {access}" if access else "from everywhere"
        self.note(f"{site}: link {where} {'restored' if up else 'cut'}")

    def status(self) -> dict[str, Any]:
        states = self.states()
        sites = []
        for name, rt in self.sites.items():
            s = states[name]
            state = "updating" if rt.updating else ("healthy" if s.healthy else "down")
            sites.append({
                "name": name, "kind": rt.site.kind, "jurisdiction": rt.site.jurisdiction, "state": state,
                "model": s.model_name, "model_path": rt.local.model if rt.local else None,
                "pids": rt.local.pids() if rt.local else [], "urls": [r.url for r in rt.replicas],
                "inflight": s.inflight, "capacity": rt.site.capacity, "served": rt.served,
                "failed": rt.failed,
                "bytes_in": rt.bytes_in, "bytes_out": rt.bytes_out, "cost_per_hour": rt.site.cost_per_hour,
                "prefill_tokens_per_s": round(s.prefill_tokens_per_s, 1), "service_s": round(s.service_s, 3)})
        links = []
        if self.proxies is not None:
            for name, rt in self.sites.items():
                for access, proxies in rt.links.items():
                    if access == CONTROL:
                        continue
                    stats = [self.proxies.call(p.stats) for p in proxies]
                    links.append({"from": access, "to": name,
                                  "rtt_ms": round(self.fleet.link(access, name).rtt_s * 1e3, 2),
                                  "down": any(st["down"] for st in stats),
                                  "bytes_up": sum(st["bytes_up"] for st in stats),
                                  "bytes_down": sum(st["bytes_down"] for st in stats)})
        return {"model": self.served_model_name, "sites": sites, "links": links,
                "rollout": self.rollout.as_json() if self.rollout is not None else None,
                "events": list(self.events)}


async def _chained(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


def create_gateway_app(gateway: Gateway, api_key: str | None = None, max_body_bytes: int = 64 << 20
                       ) -> FastAPI:
    app = FastAPI(title="llmscale edge", docs_url=None, redoc_url=None, lifespan=gateway.running)
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)

    @app.exception_handler(ConfigError)
    async def on_config_error(_: Request, e: ConfigError) -> JSONResponse:
        return error_response(400, str(e))

    for route in ROUTES:
        app.add_api_route(route, _forwarder(gateway, route), methods=["POST"])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [gateway.served_model_name, *sorted({s.model_name for s in gateway.states().values()
                                                     if s.model_name})]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "llmscale"}
                                           for n in names]}

    @app.get("/health")
    async def health() -> Response:
        up = any(s.healthy for s in gateway.states().values())
        return Response(status_code=200 if up else 503)

    @app.get("/edge/status")
    async def edge_status() -> dict[str, Any]:
        return await asyncio.to_thread(gateway.status)

    @app.post("/edge/links")
    async def links(request: Request) -> Response:
        body = await _json_object(request)
        site, access, up = body.get("site"), body.get("from"), body.get("up")
        valid = isinstance(site, str) and isinstance(up, bool) and (access is None or isinstance(access, str))
        if not valid:
            return error_response(400, 'expected {"site": NAME, "up": true|false, "from": NAME (optional)}')
        await asyncio.to_thread(gateway.set_link, site, up, access)
        return JSONResponse({"site": site, "from": access, "up": up})

    @app.post("/edge/rollout")
    async def rollout(request: Request) -> Response:
        from llmscale.cluster.rollout import start_rollout

        body = await _json_object(request)
        return JSONResponse(start_rollout(gateway, body).as_json(), status_code=202)

    return app


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ConfigError("request body must be a JSON object")
    return body


def _forwarder(gateway: Gateway, path: str) -> Any:
    async def handler(request: Request) -> Response:
        return await gateway.forward(path, request)

    return handler

