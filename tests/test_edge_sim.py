"""The fleet simulator: residency holds through failures, failovers lose nothing, nearer and
cheaper sites win, bad sites files fail in one line, and the command writes its results."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from llmscale.cli import build_parser
from llmscale.cluster.edge_sim import (
    Failure,
    SimOptions,
    cmd_simulate,
    parse_len,
    simulate_fleet,
)
from llmscale.cluster.sites import load_fleet
from llmscale.config import ConfigError

SMALL = Path(__file__).resolve().parents[1] / "benchmarks" / "sites" / "fleet-small.yaml"
FAST = dict(prompt_len=(128, 256), output_len=(16, 32))  # short requests keep the runs quick


def site(name: str, kind: str, lat: float, lon: float, jurisdiction: str, hardware: str | None = "l4",
         model: str = "qwen2.5-7b", cost: float = 1.0, replicas: int = 1) -> str:
    hw = "" if hardware is None else f", hardware: {hardware}"
    return (f"  - {{name: {name}, kind: {kind}, location: {{lat: {lat}, lon: {lon}}}, "
            f"jurisdiction: {jurisdiction}{hw}, model: {model}, replicas: {replicas}, max_num_seqs: 16, "
            f"cost_per_hour: {cost}, start: local}}\n")


def write_fleet(tmp_path: Path, *sites: str, ttft_ms: float | None = None) -> Path:
    path = tmp_path / "sites.yaml"
    path.write_text(("" if ttft_ms is None else f"ttft_ms: {ttft_ms}\n") + "sites:\n" + "".join(sites))
    return path


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["edge", "simulate", *argv])


def test_residency_holds_and_refuses_rather_than_leaving_the_jurisdiction() -> None:
    fleet = load_fleet(SMALL)
    base = SimOptions(users=300, rate=8, duration_s=10, residency_share=0.5, seed=1, **FAST)
    for failures in ((), (Failure("par", 0.0),), (Failure("par", 4.0),)):
        report = simulate_fleet(fleet, SimOptions(**{**base.__dict__, "failures": failures}))
        assert report.residency_violations == 0
        assert report.served + report.refused == report.arrivals
        tagged = [r for r in report.requests if r.residency is not None]
        assert tagged
        for r in tagged:  # every site that saw it, failovers included, is in its jurisdiction
            assert all(fleet.sites[s].jurisdiction in r.residency for s in r.sites)
        fr = [r for r in tagged if r.home == "FR"]
        assert fr
        if failures and failures[0].down_s == 0:  # par is France's only site
            assert all(r.site is None and r.refused is not None and "residency FR" in r.refused for r in fr)
            assert any("residency FR" in reason for reason in report.refused_reasons)
        if failures and failures[0].down_s > 0:  # those in flight at par when it fell are refused too
            assert any(r.sites == ["par"] and r.refused is not None for r in fr)
        after = [r for r in fr if failures and r.start_s > failures[0].down_s]
        assert all(r.refused is not None for r in after)
        untagged_fr = [r for r in report.requests if r.home == "FR" and r.residency is None]
        assert all(r.refused is None for r in untagged_fr)  # others may go abroad


def test_cloud_failure_fails_over_without_losing_requests(tmp_path: Path) -> None:
    # fra is the cheapest site, so it takes every request until it fails.
    path = write_fleet(tmp_path, site("fra", "cloud", 50.11, 8.68, "DE", "h100-sxm", "llama-3.1-8b", 1.0),
                       site("ams", "cloud", 52.37, 4.90, "NL", "h100-sxm", "llama-3.1-8b", 5.0),
                       site("muc", "edge", 48.14, 11.58, "DE", "l4", cost=3.0), ttft_ms=800)
    fleet = load_fleet(path)
    report = simulate_fleet(fleet, SimOptions(users=300, rate=10, duration_s=10, residency_share=0.5,
                                              output_len=(64, 128), failures=(Failure("fra", 5.0, 8.0),)))
    assert report.failovers > 0
    assert report.refused == 0 and report.served == report.arrivals
    moved = [r for r in report.requests if len(r.sites) > 1]
    assert len(moved) == report.failovers
    for r in moved:
        assert r.sites[0] == "fra" and "fra" not in r.sites[1:2]
        assert r.end_s is not None and r.e2e_s is not None and r.e2e_s > 0
        assert r.start_s < 5.0  # sent before the failure: its times keep that start
    during = [r for r in report.requests if 5.0 <= r.start_s < 7.5]  # placed while fra is down
    assert during and all(r.sites[0] != "fra" for r in during)
    assert report.residency_violations == 0


def test_nearer_edge_wins_and_ttft_grows_with_distance(tmp_path: Path) -> None:
    edges = write_fleet(tmp_path, site("fra", "cloud", 50.11, 8.68, "DE", "h100-sxm", "llama-3.1-8b", 6.88),
                        site("muc", "edge", 48.14, 11.58, "DE"), site("par", "edge", 48.86, 2.35, "FR"),
                        ttft_ms=800)
    report = simulate_fleet(load_fleet(edges), SimOptions(users=200, rate=1, duration_s=20, residency_share=0,
                                                          **FAST))
    for r in report.requests:  # uncongested: each edge site serves the users around it
        if r.home_site in ("muc", "par"):
            assert r.site == r.home_site
    assert report.kinds[[g.name for g in report.kinds].index("edge")].served > 0

    # Cloud only, one site far cheaper than the rest and no SLO: everyone goes there.
    cloud = write_fleet(tmp_path, site("fra", "cloud", 50.11, 8.68, "DE", "h100-sxm", "llama-3.1-8b", 1.0),
                        site("waw", "cloud", 52.23, 21.01, "PL", "h100-sxm", "llama-3.1-8b", 50.0),
                        site("nyc", "cloud", 40.71, -74.01, "US", "h100-sxm", "llama-3.1-8b", 100.0))
    report = simulate_fleet(load_fleet(cloud), SimOptions(users=300, rate=2, duration_s=15, residency_share=0,
                                                          prompt_len=(256, 256), output_len=(16, 16)))
    assert {r.site for r in report.requests} == {"fra"}
    ttft = {j: statistics.median(r.ttft_s for r in report.requests if r.home == j and r.ttft_s is not None)
            for j in ("DE", "PL", "US")}
    assert ttft["DE"] < ttft["PL"] < ttft["US"]
    assert ttft["US"] - ttft["DE"] > 0.05  # a transatlantic round trip


def test_site_without_hardware_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_fleet(tmp_path, site("fra", "cloud", 50.11, 8.68, "DE", "h100-sxm", "llama-3.1-8b"),
                       site("muc", "edge", 48.14, 11.58, "DE", None))
    with pytest.raises(ConfigError, match="'muc'.*hardware") as e:
        simulate_fleet(load_fleet(path), SimOptions(users=10, rate=1, duration_s=1))
    assert "\n" not in str(e.value)
    cmd = [sys.executable, "-m", "llmscale.cli", "edge", "simulate", "--sites", str(path), "--users", "10",
           "--duration", "1", "-q"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    err = out.stderr.strip()
    assert out.returncode == 2 and err.startswith("llmscale: error:") and "'muc'" in err and "\n" not in err

    for bad, words in ((site("muc", "edge", 48.14, 11.58, "DE", "no-such-gpu"), "not in the catalogue"),
                       (site("muc", "edge", 48.14, 11.58, "DE", "l4", "llama-3.1-70b"), "GiB")):
        with pytest.raises(ConfigError, match=f"'muc'.*{words}"):
            simulate_fleet(load_fleet(write_fleet(tmp_path, bad)), SimOptions(users=10, rate=1, duration_s=1))


def test_flags_are_checked() -> None:
    assert parse_len("64:128", "--prompt-len") == (64, 128) and parse_len("7", "--x") == (7, 7)
    assert Failure.parse("fra@10-20") == Failure("fra", 10.0, 20.0)
    for bad in ("fra", "fra@x", "fra@5-3", "@5"):
        with pytest.raises(ConfigError, match="--fail"):
            Failure.parse(bad)
    with pytest.raises(ConfigError, match="--prompt-len"):
        parse_len("9:3", "--prompt-len")
    with pytest.raises(ConfigError, match="not a site"):
        simulate_fleet(load_fleet(SMALL), SimOptions(failures=(Failure("nowhere", 1.0),)))


def test_out_writes_results_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = parse("--sites", str(SMALL), "--users", "100", "--rate", "4", "--duration", "5", "--prompt-len",
                 "128:256", "--output-len", "16", "--fail", "fra@2-4", "--out", str(out), "-q")
    cmd_simulate(args)
    doc = json.loads((out / "results.json").read_text())
    assert doc["residency_violations"] == 0
    assert doc["served"] + doc["refused"] == doc["arrivals"] > 0
    assert {row["name"] for row in doc["sites"]} == {"fra", "iad", "muc", "par"}
    assert doc["options"]["failures"][0]["site"] == "fra"
    assert (out / "ttft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_run() -> None:
    fleet = load_fleet(SMALL)
    options = SimOptions(users=100, rate=5, duration_s=5, seed=3, **FAST)
    a, b = simulate_fleet(fleet, options), simulate_fleet(fleet, options)
    assert [(r.sites, r.end_s) for r in a.requests] == [(r.sites, r.end_s) for r in b.requests]
