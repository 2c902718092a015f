"""`llmscale serve` as a child process on a free loopback port: start it, wait until it
answers, stop it. For whatever measures a real server from outside (calibration, benchmarks,
tests)."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from llmscale.config import ConfigError


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a process started next to bind. Drawn below the
    kernel's ephemeral range: until that process binds it, any socket bound to port 0 or
    connecting out may be handed a free ephemeral port (a Ray cluster starting opens dozens).
    Above Ray's worker ports (10002-19999)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    draw = random.SystemRandom()
    for _ in range(64):
        port = draw.randrange(20000, max(low, 20001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # that whole range taken: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, serve_args: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """`llmscale serve` on 127.0.0.1:`port` (its output appended to `log`, or dropped: a restarted
    server, as a rollout restarts a site's, keeps what the one before it wrote)."""
    cmd = [sys.executable, "-m", "llmscale.cli", "serve", "-q", "--host", "127.0.0.1", "--port", str(port),
           *serve_args]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300.0) -> str:
    """Poll until the server answers /v1/models; the name of the model it serves."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"llmscale serve exited with code {proc.returncode} while starting")
        try:
            r = httpx.get(f"{url}/v1/models", timeout=2, trust_env=False)
            if r.status_code == 200:
                return str(r.json()["data"][0]["id"])
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ConfigError(f"llmscale serve did not answer within {timeout_s:g} s")


def stop_server(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM (the server, or `cluster serve`, drains), then SIGKILL after `grace_s`."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
