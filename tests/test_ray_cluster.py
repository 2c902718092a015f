"""A cluster started by `connect` listens on loopback only, serves over HTTP, admits a second
driver, and leaves nothing listening once shut down.

One cluster for the module (Ray takes seconds to start). Its processes are this one and the
descendants of the Ray processes it spawned (those whose command line names the cluster's temp
dir); `ss -ltnpH` lists what each of them listens on. The cluster-free tests come first and
import Ray, as modules using ray.serve do, so `connect` runs after `import ray` as it will in use.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llmscale.ray_cluster import (
    AUTH_TOKEN_VAR,
    RayCluster,
    connect,
    is_loopback,
    rebind_address,
    serve_options,
)
from llmscale.serve.process import free_port

pytestmark = pytest.mark.skipif(sys.platform != "linux" or shutil.which("ss") is None,
                                reason="lists listeners with Linux's ss and /proc")

# Where Ray 2.60 listens by default: the dashboard agent, autoscaler and dashboard-head metrics.
FIXED_PORTS = {"ray::DashboardAgent": 52365, "autoscaler": 44217, "dashboard/dashboard.py": 44227}
JOIN_SCRIPT = """
import sys
import ray
from llmscale.ray_cluster import connect
cluster = connect(sys.argv[1])
print(cluster.started, ray.cluster_resources()["CPU"])
cluster.shutdown()
"""


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    pid: int


def test_rebind_address_replaces_only_wildcards() -> None:
    assert rebind_address("[::]:0", "127.0.0.1") == "127.0.0.1:0"
    assert rebind_address("0.0.0.0:9000", "10.0.0.2") == "10.0.0.2:9000"
    assert rebind_address("[::]:0", "::1") == "[::1]:0"
    assert rebind_address("127.0.0.1:5", "10.0.0.2") == "127.0.0.1:5"
    assert rebind_address("[::1]:5", "10.0.0.2") == "[::1]:5"


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "[::1]", "::ffff:127.0.0.1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "[::]", "*", "10.1.2.3", "::ffff:10.1.2.3"]))


def test_parse_ss_keeps_wildcards_visible() -> None:
    out = ("LISTEN 0 4096 [::ffff:127.0.0.1]:36483 *:* users:((\"raylet\",pid=12,fd=40))\n"
           "LISTEN 0 4096 *:8000 *:* users:((\"a\",pid=13,fd=3),(\"b\",pid=14,fd=3))\n"
           "LISTEN 0 4096 [::]:41000 [::]:* users:((\"ray::Serve\",pid=15,fd=9))\n"
           "LISTEN 0 128 0.0.0.0:22 0.0.0.0:*\n")
    assert parse_ss(out) == [Listener("::ffff:127.0.0.1", 36483, 12), Listener("*", 8000, 13),
                             Listener("*", 8000, 14), Listener("::", 41000, 15)]
    assert [is_loopback(listener.host) for listener in parse_ss(out)] == [True, False, False, False]


def test_serve_options_bind_the_given_host_and_start_no_grpc_proxy() -> None:
    options = serve_options("127.0.0.1", 8123)
    assert (options["http_options"].host, options["http_options"].port) == ("127.0.0.1", 8123)
    assert options["grpc_options"].grpc_servicer_functions == []


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    token_before = os.environ.get(AUTH_TOKEN_VAR)
    started = time.perf_counter()
    cluster = connect(None, num_cpus=2)
    print(f"cluster started in {time.perf_counter() - started:.1f} s")
    yield cluster
    cluster.shutdown()  # a no-op after test_shutdown_closes_every_listener
    assert os.environ.get(AUTH_TOKEN_VAR) == token_before


@pytest.fixture(scope="module")
def app_url(cluster: RayCluster) -> str:
    """Two replicas of a deployment that answers with its pid, behind the HTTP proxy."""
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    class Pid:
        def __call__(self, request: object) -> dict[str, int]:
            return {"pid": os.getpid()}

    port = free_port()
    started = time.perf_counter()
    cluster.start_serve(port)
    serve.run(Pid.bind(), name="pid", route_prefix="/pid")
    print(f"serve and 2 replicas up in {time.perf_counter() - started:.1f} s")
    return f"http://127.0.0.1:{port}/pid"


def test_head_started_here_on_loopback(cluster: RayCluster) -> None:
    assert cluster.started
    assert is_loopback(cluster.address.rpartition(":")[0])
    assert cluster.temp_dir and any(Path(cluster.temp_dir).glob("session_*"))


def test_replicas_answer_over_http_and_nothing_listens_beyond_loopback(
        cluster: RayCluster, app_url: str) -> None:
    replica_pids = {httpx.get(app_url, timeout=30).json()["pid"] for _ in range(20)}
    listeners = _cluster_listeners(cluster)
    pids = {listener.pid for listener in listeners}

    assert replica_pids <= pids  # the process tree found the replicas...
    gcs_port = int(cluster.address.rpartition(":")[2])
    assert any(listener.port == gcs_port for listener in listeners)  # ...and the GCS
    app_port = httpx.URL(app_url).port
    assert [listener.host for listener in listeners if listener.port == app_port] == ["127.0.0.1"]
    outside = [listener for listener in listeners if not is_loopback(listener.host)]
    assert outside == [], f"listening beyond loopback: {outside}"
    for role, port in FIXED_PORTS.items():
        role_ports = {lst.port for lst in listeners if role in _cmdline(lst.pid)}
        assert role_ports and port not in role_ports, f"{role} listens on {role_ports}"


def test_a_second_driver_joins_and_its_shutdown_leaves_the_cluster_running(
        cluster: RayCluster, app_url: str) -> None:
    import ray

    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    started = time.perf_counter()
    joined = subprocess.run([sys.executable, "-c", JOIN_SCRIPT, cluster.address], capture_output=True,
                            text=True, timeout=120, env={**env, **cluster.driver_env()})
    print(f"second driver joined and left in {time.perf_counter() - started:.1f} s")

    assert joined.returncode == 0, joined.stderr[-3000:]
    assert joined.stdout.split()[-2:] == ["False", "2.0"]
    assert ray.cluster_resources()["CPU"] == 2.0
    assert httpx.get(app_url, timeout=30).status_code == 200


def test_a_driver_with_a_wrong_token_is_refused(cluster: RayCluster) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    wrong = {**cluster.driver_env(), AUTH_TOKEN_VAR: "0" * 64, "RAY_NUM_REDIS_GET_RETRIES": "2"}
    refused = subprocess.run([sys.executable, "-c", JOIN_SCRIPT, cluster.address], capture_output=True,
                             text=True, timeout=120, env={**env, **wrong})

    assert refused.returncode != 0
    assert "InvalidAuthToken" in refused.stderr


def test_shutdown_closes_every_listener(cluster: RayCluster, app_url: str) -> None:
    listening = {(listener.pid, listener.port) for listener in _cluster_listeners(cluster)}
    started = time.perf_counter()
    cluster.shutdown()
    print(f"shut down in {time.perf_counter() - started:.1f} s")

    left = _still_listening(listening, timeout_s=20)
    assert not left, f"still listening after shutdown: {left}"
    assert cluster.temp_dir and not Path(cluster.temp_dir).exists()


def _still_listening(pairs: set[tuple[int, int]], timeout_s: float) -> set[tuple[int, int]]:
    """Those of the (pid, port) pairs still listening once they are all closed or time is up."""
    deadline = time.monotonic() + timeout_s
    while (left := pairs & {(lst.pid, lst.port) for lst in _listeners()}) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _cluster_listeners(cluster: RayCluster) -> list[Listener]:
    pids = _cluster_pids(cluster)
    return [listener for listener in _listeners() if listener.pid in pids]


def _cluster_pids(cluster: RayCluster) -> set[int]:
    """This process and every descendant of the Ray processes it started for `cluster`."""
    children = _children()
    roots = [pid for pid in children.get(os.getpid(), []) if cluster.temp_dir in _cmdline(pid)]
    assert roots, "no Ray process found among this process's children"
    found, todo = {os.getpid()}, list(roots)
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _listeners() -> list[Listener]:
    """Every listening TCP socket on the machine, one entry per owning process."""
    return parse_ss(subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout)


def parse_ss(out: str) -> list[Listener]:
    listeners = []
    for line in out.splitlines():
        fields = line.split()
        host, _, port = fields[3].rpartition(":")
        for pid in re.findall(r"pid=(\d+)", line):
            listeners.append(Listener(host.strip("[]"), int(port), int(pid)))
    return listeners

