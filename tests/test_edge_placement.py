"""The sites file and placement: invariants over random fleets, requests and failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscale.cluster.placement import Demand, SiteState, Unplaceable, place, predicted_ttft, queue_seconds
from llmscale.cluster.sites import Fleet, FleetSpec, Location, Site, great_circle_km, parse_fleet
from llmscale.config import ConfigError

JURISDICTIONS = ("DE", "FR", "US", "JP")
MODELS = ("small", "large")

locations = st.builds(Location, lat=st.floats(-60, 70), lon=st.floats(-180, 180))


@st.composite
def fleets(draw: st.DrawFn) -> tuple[Fleet, dict[str, SiteState]]:
    n = draw(st.integers(1, 6))
    names = [f"s{i}" for i in range(n)]
    sites, states = [], {}
    for i in range(n):
        name = f"s{i}"
        sites.append(Site(name=name, kind=draw(st.sampled_from(("edge", "cloud"))), location=draw(locations),
                          jurisdiction=draw(st.sampled_from(JURISDICTIONS)), replicas=draw(st.integers(1, 4)),
                          max_num_seqs=draw(st.integers(1, 8)), cost_per_hour=draw(st.floats(0, 50)),
                          start="local"))
        inflight = draw(st.integers(0, 40))
        states[name] = SiteState(healthy=draw(st.booleans()), inflight=inflight,
                                 remaining_s=tuple(draw(st.lists(st.floats(0, 10), max_size=inflight))),
                                 model_name=draw(st.sampled_from(MODELS)),
                                 prefill_tokens_per_s=draw(st.floats(100, 1e5)),
                                 service_s=draw(st.floats(0.01, 10)),
                                 down_links=frozenset(draw(st.sets(st.sampled_from(names)))))
    ttft_ms = draw(st.none() | st.floats(1, 5000))
    return Fleet(FleetSpec(sites=tuple(sites), ttft_ms=ttft_ms)), states


demands = st.builds(
    Demand, user=st.none() | locations,
    residency=st.none() | st.frozensets(st.sampled_from(JURISDICTIONS), min_size=1, max_size=2),
    model=st.none() | st.sampled_from((*MODELS, "fleet")),
    kind=st.none() | st.sampled_from(("edge", "cloud")),
    ttft_slo_s=st.none() | st.floats(0.001, 5), prompt_tokens=st.integers(1, 4000))


def allowed(fleet: Fleet, d: Demand, states: dict[str, SiteState]) -> list[Site]:
    """Every hard constraint, written out independently of `place`."""
    out = []
    for s in fleet.sites.values():
        st_ = states[s.name]
        if d.residency is not None and s.jurisdiction not in d.residency:
            continue
        if d.model not in (None, "fleet") and st_.model_name != d.model:
            continue
        if d.kind is not None and s.kind != d.kind:
            continue
        if not st_.healthy or fleet.route(d.user, s.name).access in st_.down_links:
            continue
        out.append(s)
    return out


@settings(max_examples=400, deadline=None)
@given(fleets(), demands)
def test_placement_obeys_hard_constraints_and_prefers_cheapest_within_slo(fs, d):
    fleet, states = fs
    ok = allowed(fleet, d, states)
    if not ok:
        with pytest.raises(Unplaceable) as e:
            place(fleet, d, states, fleet_model="fleet")
        assert "\n" not in str(e.value) and str(e.value)
        return
    p = place(fleet, d, states, fleet_model="fleet")
    site = fleet.sites[p.site]
    assert site in ok  # residency, model, kind, health: never violated
    if d.residency is not None:
        assert site.jurisdiction in d.residency
    slo = d.ttft_slo_s if d.ttft_slo_s is not None else fleet.default_ttft_s
    ttfts = {s.name: predicted_ttft(s, states[s.name], fleet.route(d.user, s.name), d.prompt_tokens)
             for s in ok}
    meeting = [s for s in ok if slo is None or ttfts[s.name] <= slo]
    assert p.meets_slo == bool(meeting)
    if meeting:  # within the SLO, nothing cheaper was passed over
        assert site in meeting
        assert site.replica_cost_per_hour == min(s.replica_cost_per_hour for s in meeting)
    else:  # none meets it: the fastest allowed one
        assert ttfts[p.site] == min(ttfts.values())


def three_sites(ttft_ms: float = 500) -> Fleet:
    return parse_fleet(f"""
ttft_ms: {ttft_ms}
sites:
  - {{name: edge-munich, kind: edge, location: {{lat: 48.14, lon: 11.58}}, jurisdiction: DE,
     cost_per_hour: 0.5, start: local, max_num_seqs: 2}}
  - {{name: edge-paris, kind: edge, location: {{lat: 48.86, lon: 2.35}}, jurisdiction: FR,
     cost_per_hour: 0.5, start: local, max_num_seqs: 2}}
  - {{name: cloud-frankfurt, kind: cloud, location: {{lat: 50.11, lon: 8.68}}, jurisdiction: DE,
     cost_per_hour: 8, replicas: 2, max_num_seqs: 4, url: "http://127.0.0.1:9"}}
""", "sites.yaml")


def test_nearer_site_wins_until_full_then_next_within_residency():
    fleet = three_sites()
    states = {n: SiteState(model_name="m", service_s=2.0) for n in fleet.sites}
    munich_user = Location(lat=48.2, lon=11.6)
    d = Demand(user=munich_user, prompt_tokens=100)
    assert place(fleet, d, states).site == "edge-munich"
    paris_user = Location(lat=48.8, lon=2.3)
    assert place(fleet, Demand(user=paris_user, prompt_tokens=100), states).site == "edge-paris"
    states["edge-munich"].inflight = 4  # full: two requests ahead of the next one
    assert place(fleet, d, states).site == "edge-paris"
    tagged = Demand(user=munich_user, residency=frozenset({"DE"}), prompt_tokens=100)
    assert place(fleet, tagged, states).site == "cloud-frankfurt"
    states["cloud-frankfurt"].healthy = False
    slow = place(fleet, tagged, states)  # no DE site meets the SLO: the fastest DE site still serves
    assert slow.site == "edge-munich" and not slow.meets_slo
    states["edge-munich"].healthy = False
    with pytest.raises(Unplaceable, match="residency DE.*edge-munich, cloud-frankfurt"):
        place(fleet, tagged, states)
    with pytest.raises(Unplaceable, match="jurisdiction JP"):
        place(fleet, Demand(residency=frozenset({"JP"})), states)


def test_queue_waits_for_the_slot_it_will_take():
    site = three_sites().sites["edge-munich"]  # two slots
    assert queue_seconds(site, SiteState(inflight=1, remaining_s=(3.0,))) == 0.0
    assert queue_seconds(site, SiteState(inflight=2, remaining_s=(5.0, 3.0))) == 3.0
    assert queue_seconds(site, SiteState(inflight=3, remaining_s=(5.0, 3.0, 9.0))) == 5.0
    assert queue_seconds(site, SiteState(inflight=3, service_s=2.0)) == 2.0  # two ahead, two slots


def test_derived_rtt_grows_with_distance_and_links_override():
    fleet = three_sites()
    paris_to_munich = great_circle_km(fleet.sites["edge-paris"].location, fleet.sites["edge-munich"].location)
    assert 650 < paris_to_munich < 720
    link = fleet.link("edge-paris", "edge-munich")
    assert link.rtt_s == pytest.approx((2 * paris_to_munich / 200 + 1) / 1e3)
    assert fleet.link("edge-paris", "edge-paris").rtt_s == pytest.approx(1e-3)
    route = fleet.route(Location(lat=48.86, lon=2.35), "edge-munich")
    assert route.access == "edge-paris" and route.rtt_s == pytest.approx(route.access_rtt_s + link.rtt_s)
    spec = fleet.spec.model_dump()
    spec["links"] = [{"between": ["edge-munich", "edge-paris"], "rtt_ms": 40, "loss": 0.01}]
    overridden = Fleet(FleetSpec.model_validate(spec))
    assert overridden.link("edge-munich", "edge-paris").rtt_s == pytest.approx(0.040)
    assert overridden.link("edge-munich", "edge-paris").loss == 0.01


@pytest.mark.parametrize("text, message", [
    ("sites: []", "sites"),
    ("nothing: 1", "top-level 'sites:'"),
    ("sites: [{name: a, kind: edge, location: {lat: 95, lon: 0}, jurisdiction: DE, cost_per_hour: 1, "
     "start: local}]", "sites[0] 'a', field 'location.lat'"),
    ("sites: [{name: a, kind: fog, location: {lat: 5, lon: 0}, jurisdiction: DE, cost_per_hour: 1, "
     "start: local}]", "field 'kind'"),
    ("sites: [{name: a, kind: edge, location: {lat: 5, lon: 0}, jurisdiction: DE, cost_per_hour: 1}]",
     "exactly one of 'start: local' and 'url:'"),
    ("sites: [{name: a, kind: edge, location: {lat: 5, lon: 0}, jurisdiction: d, cost_per_hour: 1, "
     "start: local}]", "field 'jurisdiction'"),
    ("sites: [{name: a, kind: edge, location: {lat: 5, lon: 0}, jurisdiction: DE, cost_per_hour: 1, "
     "start: local, gpu: 1}]", "field 'gpu'"),
    ("sites: [{name: a, kind: edge, location: {lat: 5, lon: 0}, jurisdiction: DE, cost_per_hour: 1, "
     "start: local}]\nlinks: [{between: [a, b], rtt_ms: 3}]", "'b' is not a site"),
    ("sites: [", "not valid YAML"),
])
def test_bad_sites_files_give_one_line_errors(text, message):
    with pytest.raises(ConfigError) as e:
        parse_fleet(text, "sites.yaml")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("sites.yaml: ")


def test_user_location_header_parses():
    assert Location.parse("48.1, 11.6") == Location(lat=48.1, lon=11.6)
    for bad in ("48.1", "north,south", "91,0"):
        with pytest.raises(ValueError):
            Location.parse(bad)


def test_readme_sites_example_parses():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("## Edge", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    fleet = parse_fleet(example, "README")
    assert list(fleet.sites) == ["edge-munich", "edge-paris", "cloud-frankfurt"]
    assert fleet.link("edge-munich", "cloud-frankfurt").rtt_s == pytest.approx(0.012)
