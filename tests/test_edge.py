"""`llmscale edge serve`, the local demo: three real sites (two edge sites in different
jurisdictions and a cloud site) behind emulated links, one gateway process in front."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from llmscale.serve.process import free_port

MUNICH, PARIS = "48.14,11.58", "48.86,2.35"


def _sites_file(folder: Path, edge_model: Path, cloud_model: Path) -> Path:
    path = folder / "sites.yaml"
    path.write_text(f"""
ttft_ms: 2000
sites:
  - name: edge-munich
    kind: edge
    location: {{lat: 48.14, lon: 11.58}}
    jurisdiction: DE
    max_num_seqs: 2
    model: {edge_model}
    cost_per_hour: 0.5
    start: local
  - name: edge-paris
    kind: edge
    location: {{lat: 48.86, lon: 2.35}}
    jurisdiction: FR
    max_num_seqs: 2
    model: {edge_model}
    cost_per_hour: 0.5
    start: local
  - name: cloud-frankfurt
    kind: cloud
    location: {{lat: 50.11, lon: 8.68}}
    jurisdiction: DE
    max_num_seqs: 8
    hardware: c7i.8xlarge
    model: {cloud_model}
    cost_per_hour: 4.0
    start: local
links:
  - between: [edge-munich, cloud-frankfurt]
    rtt_ms: 12
""")
    return path


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge")
    sites = _sites_file(folder, tiny_model("llama"), tiny_model("qwen2"))
    port = free_port()
    log = open(folder / "gateway.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "llmscale.cli", "edge", "serve", "--sites", str(sites),
                             "--port", str(port), "--log-dir", str(folder / "logs")],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            assert proc.poll() is None, (folder / "gateway.log").read_text()
            try:
                st = httpx.get(f"{url}/edge/status", timeout=5).json()
                if all(s["state"] == "healthy" and s["model"] for s in st["sites"]):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (folder / "gateway.log").read_text()
            time.sleep(0.5)
        yield url, proc, folder, st
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _ask(url: str, where: str | None = None, max_tokens: int = 4, **headers: str) -> httpx.Response:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if where:
        h["x-llmscale-user-location"] = where
    body = {"prompt": "The capital of France is", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, headers=h, timeout=120)


def _wait_healthy(url: str, index: int, timeout_s: float) -> None:
    """Until the gateway sees site `index` healthy; else fail saying whether its processes live
    and what each answers to a /health sent straight to it, past the gateway's links."""
    deadline = time.monotonic() + timeout_s
    while (site := (status := _status(url))["sites"][index])["state"] != "healthy":
        if time.monotonic() > deadline:
            alive = {pid: Path(f"/proc/{pid}").exists() for pid in site["pids"]}
            direct = {}
            for replica in site["urls"]:
                try:
                    direct[replica] = httpx.get(f"{replica}/health", timeout=5).status_code
                except httpx.HTTPError as e:
                    direct[replica] = repr(e)
            links = {link["from"]: link["down"] for link in status["links"] if link["to"] == site["name"]}
            raise AssertionError(f"{site['name']} not healthy after {timeout_s} s: {site['state']}; "
                                 f"processes alive {alive}; /health straight to it: {direct}; "
                                 f"links into it down: {links}; events: {status['events'][-8:]}")
        time.sleep(0.2)


def _link(url: str, site: str, up: bool) -> None:
    httpx.post(f"{url}/edge/links", json={"site": site, "up": up}, timeout=10).raise_for_status()


def _status(url: str) -> dict:
    return httpx.get(f"{url}/edge/status", timeout=10).json()


def test_nearest_site_serves_and_bad_requests_are_refused_clearly(gateway):
    url, _, _, first = gateway
    priors = {s["name"]: s["prefill_tokens_per_s"] for s in first["sites"]}
    assert priors["edge-munich"] == 2000.0 and priors["cloud-frankfurt"] != 2000.0  # from its hardware
    r = _ask(url, MUNICH)
    assert r.status_code == 200 and r.headers["x-llmscale-site"] == "edge-munich"
    assert r.json()["usage"]["completion_tokens"] == 4
    assert _ask(url, PARIS).headers["x-llmscale-site"] == "edge-paris"
    assert _ask(url, PARIS, x_llmscale_site_kind="cloud").headers["x-llmscale-site"] == "cloud-frankfurt"
    assert _ask(url, PARIS, x_llmscale_residency="DE").headers["x-llmscale-site"] in ("edge-munich",
                                                                                      "cloud-frankfurt")
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
                      headers={"x-llmscale-user-location": MUNICH}) as s:
        assert s.headers["x-llmscale-site"] == "edge-munich"
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3

    refused = _ask(url, MUNICH, x_llmscale_residency="JP")
    assert refused.status_code == 503
    assert "jurisdiction JP" in refused.json()["error"]["message"]
    for header, value in (("x_llmscale_user_location", "north"), ("x_llmscale_residency", "d e"),
                          ("x_llmscale_ttft_ms", "-5"), ("x_llmscale_site_kind", "fog")):
        bad = _ask(url, None, **{header: value})
        assert bad.status_code == 400 and header.replace("_", "-") in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", content=b"{", timeout=10).status_code == 400
    site_error = _ask(url, MUNICH, max_tokens=-1)  # the site's own validation comes back as it is
    assert site_error.status_code in (400, 422) and "error" in site_error.json()


def test_full_edge_site_overflows_to_the_next_allowed_site(gateway):
    url, *_ = gateway
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        tagged = list(pool.map(lambda _: _ask(url, MUNICH, 400, x_llmscale_residency="DE"), range(8)))
        untagged = list(pool.map(lambda _: _ask(url, MUNICH, 400), range(8)))
    assert all(r.status_code == 200 for r in tagged + untagged)
    by_site = Counter(r.headers["x-llmscale-site"] for r in tagged)
    assert set(by_site) == {"edge-munich", "cloud-frankfurt"}  # DE only; munich first, then the cloud
    untagged_sites = Counter(r.headers["x-llmscale-site"] for r in untagged)
    assert untagged_sites["edge-munich"] >= 1 and len(untagged_sites) >= 2


def test_requests_a_cut_site_holds_unanswered_are_answered_elsewhere(gateway):
    url, *_ = gateway
    slow = {"x_llmscale_ttft_ms": "60000"}  # munich stays feasible with requests queued there
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        held = [pool.submit(_ask, url, MUNICH, 1000, **slow) for _ in range(6)]
        # Six on a site that runs two at once: cut it once all are there, four of them queued.
        deadline = time.monotonic() + 30
        while _status(url)["sites"][0]["inflight"] < 6:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _link(url, "edge-munich", False)
        answers = [f.result() for f in held]
    _link(url, "edge-munich", True)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert all(r.json()["usage"]["completion_tokens"] == 1000 for r in answers)
    assert {r.headers["x-llmscale-site"] for r in answers} & {"edge-paris", "cloud-frankfurt"}
    _wait_healthy(url, 0, timeout_s=20)


def test_cut_site_fails_over_within_seconds_and_comes_back(gateway):
    url, *_ = gateway
    httpx.post(f"{url}/edge/links", json={"site": "edge-munich", "up": False}, timeout=10).raise_for_status()
    cut = time.monotonic()
    # At once, before the health checks notice: the request fails over instead of failing.
    r = _ask(url, MUNICH, x_llmscale_residency="DE")
    assert r.status_code == 200 and r.headers["x-llmscale-site"] == "cloud-frankfurt"
    while _status(url)["sites"][0]["state"] != "down":
        assert time.monotonic() - cut < 5
        time.sleep(0.1)
    assert _ask(url, MUNICH).headers["x-llmscale-site"] == "edge-paris"  # cheaper than the cloud
    assert _ask(url, PARIS, x_llmscale_residency="DE").headers["x-llmscale-site"] == "cloud-frankfurt"
    httpx.post(f"{url}/edge/links", json={"site": "edge-paris", "up": False}, timeout=10).raise_for_status()
    refused = _ask(url, PARIS, x_llmscale_residency="FR")
    assert refused.status_code == 503 and "FR" in refused.json()["error"]["message"]
    for site in ("edge-munich", "edge-paris"):
        httpx.post(f"{url}/edge/links", json={"site": site, "up": True}, timeout=10).raise_for_status()
    _wait_healthy(url, 0, timeout_s=20)
    deadline = time.monotonic() + 20
    while _ask(url, MUNICH).headers["x-llmscale-site"] != "edge-munich":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    st = _status(url)
    assert all(s["state"] == "healthy" for s in st["sites"])
    moved = {(link["from"], link["to"]): link for link in st["links"]}
    assert moved["edge-munich", "edge-munich"]["bytes_up"] > 0
    assert moved["edge-munich", "cloud-frankfurt"]["bytes_down"] > 0
    assert moved["edge-munich", "cloud-frankfurt"]["rtt_ms"] == 12
    assert any("edge-munich: down" in e["message"] for e in st["events"])


def _rollout(url: str, model: Path, **extra) -> dict:
    body = {"model": str(model), "waves": "50%,100%", **extra}
    r = httpx.post(f"{url}/edge/rollout", json=body, timeout=10)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 180
    while (rollout := _status(url)["rollout"])["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    return rollout


def test_rollout_in_waves_and_a_broken_model_rolls_back(gateway, tiny_model):
    url, _, folder, _ = gateway
    copy = folder / "edge-v2"
    shutil.copytree(tiny_model("llama"), copy)
    done = _rollout(url, copy, min_agreement=1.0, health_slo="ttft_p99_ms=20000")
    assert done["state"] == "done", done["log"]
    assert done["waves"] == [["edge-munich"], ["edge-paris"]]
    sites = {s["name"]: s for s in _status(url)["sites"]}
    assert sites["edge-munich"]["model_path"] == str(copy) and sites["edge-paris"]["model_path"] == str(copy)
    assert sites["cloud-frankfurt"]["model_path"] != str(copy)  # only edge sites roll

    broken = folder / "edge-v3"
    shutil.copytree(tiny_model("llama"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    failed = _rollout(url, broken)
    assert failed["state"] == "rolled_back", failed["log"]
    messages = " | ".join(line["message"] for line in failed["log"])
    assert "edge-munich failed: did not come up" in messages and "edge-paris" not in failed["updated"]
    sites = {s["name"]: s for s in _status(url)["sites"]}
    assert sites["edge-munich"]["model_path"] == str(copy)
    deadline = time.monotonic() + 20
    while _ask(url, MUNICH).headers["x-llmscale-site"] != "edge-munich":
        assert time.monotonic() < deadline
        time.sleep(0.3)

    bad = httpx.post(f"{url}/edge/rollout", json={"model": str(folder / "missing")}, timeout=10)
    assert bad.status_code == 400 and "not found" in bad.json()["error"]["message"]


def test_bench_serve_carries_headers_to_the_gateway(gateway, tmp_path):
    url, *_ = gateway
    before = {s["name"]: s["served"] for s in _status(url)["sites"]}
    cmd = [sys.executable, "-m", "llmscale.cli", "-q", "bench", "serve", "--base-url", url,
           "--header", f"x-llmscale-user-location:{PARIS}", "--header", "x-llmscale-residency:FR",
           "--num-prompts", "4", "--prompt-len", "fixed:32", "--output-len", "fixed:4", "--warmup", "0",
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["summary"]["completed"] == 4
    after = {s["name"]: s["served"] for s in _status(url)["sites"]}
    assert after["edge-paris"] - before["edge-paris"] == 4
    for other in ("edge-munich", "cloud-frankfurt"):
        assert after[other] == before[other]
    failed_before = next(s["failed"] for s in _status(url)["sites"] if s["name"] == "edge-paris")
    for _ in range(3):  # a client that hangs up as soon as it has [DONE] was still served
        body = {"prompt": "hi", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                          headers={"x-llmscale-user-location": PARIS}) as s:
            for line in s.iter_lines():
                if line == "data: [DONE]":
                    break
    deadline = time.monotonic() + 5
    while (paris := next(s for s in _status(url)["sites"] if s["name"] == "edge-paris"))["served"] < \
            after["edge-paris"] + 3:
        assert time.monotonic() < deadline, paris
        time.sleep(0.1)
    assert paris["served"] == after["edge-paris"] + 3 and paris["failed"] == failed_before
    bad = subprocess.run([sys.executable, "-m", "llmscale.cli", "bench", "serve", "--base-url", url,
                          "--header", "no-colon"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--header 'no-colon': expected NAME:VALUE" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_rollout_waves_and_health_slo_parse():
    from llmscale.cluster.rollout import HealthSlo, parse_waves, wave_sites
    from llmscale.config import ConfigError

    assert parse_waves("10%,50%,100%") == [0.1, 0.5, 1.0]
    assert wave_sites(list("abcdefghij"), [0.1, 0.5, 1.0]) == [["a"], list("bcde"), list("fghij")]
    assert wave_sites(["a", "b"], [0.1, 0.5, 1.0]) == [["a"], ["b"]]  # no empty wave
    for bad in ("50%,10%,100%", "10%,50%", "x", "0%,100%"):
        with pytest.raises(ConfigError, match="--waves"):
            parse_waves(bad)
    assert HealthSlo.parse("ttft_p99_ms=800,error_rate=0.1") == HealthSlo(800.0, 0.1)
    for bad in ("p50=3", "ttft_p99_ms=x", "error_rate=2"):
        with pytest.raises(ConfigError, match="--health-slo"):
            HealthSlo.parse(bad)


def test_status_cli_and_shutdown_stop_every_site(gateway):
    url, proc, _, _ = gateway
    out = subprocess.run([sys.executable, "-m", "llmscale.cli", "edge", "status", "--url", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "edge-munich" in out.stdout and "cloud-frankfurt" in out.stdout
    as_json = subprocess.run([sys.executable, "-m", "llmscale.cli", "edge", "status", "--url", url, "--json"],
                             capture_output=True, text=True, timeout=60)
    pids = [p for s in json.loads(as_json.stdout)["sites"] for p in s["pids"]]
    assert len(pids) == 3
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_serve_refuses_a_fleet_whose_local_models_are_not_here(tmp_path):
    fleet = Path(__file__).parent.parent / "benchmarks" / "sites" / "fleet-small.yaml"
    out = subprocess.run([sys.executable, "-m", "llmscale.cli", "edge", "serve", "--sites", str(fleet),
                          "--port", str(free_port()), "--log-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is not a model folder or .gguf on this machine" in out.stderr
    assert out.stderr.count("\n") == 1 and not list(tmp_path.iterdir())  # nothing was started
