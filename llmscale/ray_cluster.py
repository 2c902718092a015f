"""The Ray cluster llmscale runs on: behind `llmscale cluster serve`, and for an engine's worker ranks on Ray.

`connect(None, ...)` starts a single-node head inside this process (`ray.init`) with every
listener on loopback: the node IP is 127.0.0.1, so GCS, raylet, agents and each worker's core
gRPC server bind it; the fixed ports two clusters on one machine would share are moved to free
ones; the session directory is a temp dir of ours; token auth is on, with a token fresh for this
process (Ray keeps the first it loads, so every head the process starts shares it); and a
worker setup hook rebinds the gRPC servers Serve opens on `[::]` to the node IP. That environment
is decided once (`HEAD_ENV`) and set before Ray starts a process. `connect(address, ...)` joins a
running cluster as one more driver (whose job gets the same hook) and changes none of its
settings. `RayCluster.shutdown` stops Serve and Ray only where this process started them.
`serve_options` keeps the Serve HTTP proxy on the host asked for and the gRPC proxy off.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

LOOPBACK = "127.0.0.1"
SERVE_PORT = 8000

LOOPBACK_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_VAR = "RAY_AUTH_MODE"
AUTH_TOKEN_VAR = "RAY_AUTH_TOKEN"

# Set in os.environ before ray.init, so the GCS, raylet and every process they spawn inherit it
# (workers too: no runtime_env env_vars needed, and the token stays out of the job's config).
# Checked against ray 2.60 by tests/test_ray_cluster.py, which lists every listener of a cluster.
HEAD_ENV: Mapping[str, str] = MappingProxyType({
    # Off Windows/macOS Ray takes the machine's external address as the node IP and binds its
    # core servers to all interfaces. This flag (meant for those platforms) makes the node IP
    # loopback, and then GCS, raylet, agents and core workers bind 127.0.0.1 only.
    LOOPBACK_FLAG: "0",
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report leaves the machine
    # The autoscaler and dashboard-head metrics servers open on fixed ports (44217, 44227) even
    # with the dashboard off; 0 lets each cluster take a free one instead of colliding.
    "AUTOSCALER_METRIC_PORT": "0",
    "DASHBOARD_METRIC_PORT": "0",
})
# The dashboard agent's HTTP server is fixed at 52365 too; ray.init has no argument for it.
DASHBOARD_AGENT_PORT = 0

# Serve replicas open their inter-deployment gRPC server on "[::]:0" (ray/serve/_private/
# replica.py); workers run this hook at start-up and bind such servers to the node IP instead.
GRPC_HOOK = f"{__name__}.bind_grpc_to_node_ip"
WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})


@dataclass
class RayCluster:
    """A connection to a Ray cluster, and whether this process owns it."""

    address: str  # the GCS address, host:port: what a second driver passes as `address`
    started: bool  # True when this process started the cluster, and so stops it
    host: str = LOOPBACK  # where the Serve HTTP proxy binds
    auth_token: str | None = None  # set only for a cluster we started
    temp_dir: str | None = None  # Ray's session directory lives under it (a cluster we started)
    _saved_env: dict[str, str | None] = field(default_factory=dict, repr=False)
    _closed: bool = field(default=False, repr=False)

    def driver_env(self) -> dict[str, str]:
        """What another driver's environment needs to join a cluster we started."""
        if self.auth_token is None:
            return {}
        # The flag keeps Ray from rewriting our 127.0.0.1 address to an external one (`connect`
        # handles that itself; a plain `ray.init(address=...)` needs it).
        return {LOOPBACK_FLAG: HEAD_ENV[LOOPBACK_FLAG], AUTH_MODE_VAR: "token",
                AUTH_TOKEN_VAR: self.auth_token}

    def start_serve(self, port: int = SERVE_PORT) -> None:
        """Start Serve (if not running) with its HTTP proxy on this cluster's host."""
        from ray import serve

        serve.start(**serve_options(self.host, port))

    def shutdown(self) -> None:
        """Stop Serve and Ray if this process started them; otherwise only disconnect."""
        import ray

        if self._closed:
            return
        self._closed = True
        if self.started and "ray.serve" in sys.modules:  # Serve can run only once imported
            from ray import serve

            serve.shutdown()
        ray.shutdown()  # for a joined cluster: disconnects this driver, the cluster stays
        if self.started:
            _restore_env(self._saved_env)
            _stop_leftovers(self.temp_dir or "")
            shutil.rmtree(self.temp_dir or "", ignore_errors=True)


def connect(address: str | None, num_cpus: int | None = None, host: str = LOOPBACK,
            log_to_driver: bool = True) -> RayCluster:
    """Join the cluster at `address`, or start a loopback-only head here when it is None.

    `host` is where the Serve HTTP proxy will bind (`RayCluster.start_serve`); the listeners of
    a head started here stay on loopback whatever it is. That head lives as long as this process.
    `log_to_driver`: print the cluster's workers' logs here (Ray's default).
    """
    if address is not None:
        return _join(address, host, log_to_driver)
    return _start_head(num_cpus, host, log_to_driver)


def serve_options(host: str = LOOPBACK, port: int = SERVE_PORT) -> dict[str, Any]:
    """Keyword arguments for `serve.start`: the HTTP proxy on host:port, no gRPC proxy (with no
    servicers Serve starts none; it would bind [::]:9000)."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    return {
        "http_options": HTTPOptions(host=host, port=port),
        "grpc_options": gRPCOptions(grpc_servicer_functions=[]),
    }


def bind_grpc_to_node_ip() -> None:
    """Worker setup hook: gRPC servers this process opens on a wildcard address bind the node IP.

    Runs in every worker of a job connected by `connect` (a module-level function, so workers
    import it by name). The node IP is loopback on a head started here; on a multi-node cluster
    it is the address other nodes already use to reach this one.
    """
    import grpc._server
    import grpc.aio._server
    import ray

    node_ip = ray.util.get_node_ip_address()
    # The concrete classes that grpc.server() and grpc.aio.server() return.
    for server_class in (grpc._server._Server, grpc.aio._server.Server):
        for method in ("add_insecure_port", "add_secure_port"):
            _rebind_method(server_class, method, node_ip)


def rebind_address(address: str, host: str) -> str:
    """`address` ("host:port") with a wildcard host replaced by `host`; others are kept."""
    bind_host, _, port = address.rpartition(":")
    if bind_host not in WILDCARD_HOSTS:
        return address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether `host` ("localhost" or an IP, maybe bracketed or IPv4-mapped) is loopback."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _rebind_method(server_class: type, method: str, host: str) -> None:
    original: Callable[..., int] = getattr(server_class, method)

    @functools.wraps(original)
    def bind(self: Any, address: str, *args: Any, **kwargs: Any) -> int:
        return original(self, rebind_address(address, host), *args, **kwargs)

    setattr(server_class, method, bind)


def _job_runtime_env() -> dict[str, str]:
    return {"worker_process_setup_hook": GRPC_HOOK}


def _join(address: str, host: str, log_to_driver: bool) -> RayCluster:
    import ray

    _reread_auth_env()
    if is_loopback(address.rpartition(":")[0]):
        _resolve_localhost_to_loopback()
    # Only this driver's job gets the hook; the cluster's own settings are left as they are.
    context = ray.init(address=address, runtime_env=_job_runtime_env(), log_to_driver=log_to_driver)
    return RayCluster(address=context.address_info["gcs_address"], started=False, host=host)


def _start_head(num_cpus: int | None, host: str, log_to_driver: bool) -> RayCluster:
    temp_dir = tempfile.mkdtemp(prefix="llmscale-ray-")
    token = os.environ.get(AUTH_TOKEN_VAR) or _process_token()
    saved = _apply_env(_head_env(token))
    try:
        gcs_address = _init_head(num_cpus, temp_dir, log_to_driver)
    except BaseException:
        _restore_env(saved)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    cluster = RayCluster(address=gcs_address, started=True, host=host, auth_token=token,
                         temp_dir=temp_dir, _saved_env=saved)
    atexit.register(cluster.shutdown)  # Ray stops its processes at exit; this also drops temp_dir
    return cluster


@functools.cache
def _process_token() -> str:
    """One fresh token for every head this process starts: Ray caches the first token it loads
    for the life of the process, so a second head with another one could not be reached."""
    return secrets.token_hex(32)


def _head_env(token: str) -> dict[str, str]:
    # Token auth, decided here rather than left to Ray's default, which writes ~/.ray/auth_token:
    # a token from the environment is kept (drivers that know it can join), else a fresh one.
    return {**HEAD_ENV, AUTH_MODE_VAR: "token", AUTH_TOKEN_VAR: token}


def _init_head(num_cpus: int | None, temp_dir: str, log_to_driver: bool) -> str:
    import ray

    _reread_auth_env()
    _resolve_localhost_to_loopback()
    with _dashboard_agent_port(DASHBOARD_AGENT_PORT):
        context = ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
                           runtime_env=_job_runtime_env(), log_to_driver=log_to_driver)
    return context.address_info["gcs_address"]


# Ray reads the next two settings when it is imported, and `import ray` may already have happened
# (modules using ray.serve import it at load): they are applied again just before ray.init.


def _reread_auth_env() -> None:
    from ray._raylet import Config

    Config.initialize("")  # RayConfig caches RAY_AUTH_MODE; Ray refreshes it the same way


def _resolve_localhost_to_loopback() -> None:
    """What RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does in this process: without it Ray rewrites a
    loopback node or cluster address to the machine's external one, which nothing here serves."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def _dashboard_agent_port(port: int) -> Iterator[None]:
    """ray.init has no argument for the dashboard agent's HTTP port and RayParams defaults it to
    52365; during ray.init, RayParams defaults it to `port` instead."""
    from ray._private import parameter

    original = parameter.RayParams

    class RayParams(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", port)
            super().__init__(*args, **kwargs)

    parameter.RayParams = RayParams
    try:
        yield
    finally:
        parameter.RayParams = original


def _apply_env(env: Mapping[str, str]) -> dict[str, str | None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    return saved


def _restore_env(saved: Mapping[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _stop_leftovers(temp_dir: str, grace_s: float = 5.0) -> None:
    """Stop what outlives `ray.shutdown()`: the raylet's agents notice their raylet is gone
    only after about a minute, listening (on loopback) until then. Every process of a head
    started here names its temp dir on its command line, and no other process does."""
    if not temp_dir:
        return
    pids = [pid for pid in _pids_naming(temp_dir) if pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]
            time.sleep(0.1)
        if not pids:
            return


def _pids_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
    return found


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
