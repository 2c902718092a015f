"""Start a real `llmscale serve` process on a free port and wait until /health answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import IO

import httpx

from llmscale.serve.process import free_port


def start_server(*args: str, timeout_s: float = 180,
                 stderr: IO[bytes] | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """`llmscale serve --port <free> *args`; returns (base url, process) once it is healthy.
    Its stderr goes to `stderr` when given (a file: a pipe nobody reads could fill and block it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmscale.cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, "server exited during startup"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.5)
