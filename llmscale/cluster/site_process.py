"""A `start: local` site: its replicas as `llmscale serve` processes on this machine.

Each replica keeps its loopback port for the site's life, so the links that lead to it (and
anything else that holds its address) stay valid when a rollout restarts it with another model.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from llmscale.cluster.sites import Site
from llmscale.serve.process import free_port, start_server, stop_server, wait_ready


class LocalSite:
    def __init__(self, site: Site, log_dir: Path) -> None:
        self.site = site
        self.log_dir = log_dir
        self.ports = [free_port() for _ in range(site.replicas)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.model = site.model  # what it runs now (None: the built-in model)

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def start(self, model: str | None) -> None:
        """Start every replica on `model` (without waiting for them to answer)."""
        self.model = model
        args = [*(["--model", model] if model else []), "--max-num-seqs", str(self.site.max_num_seqs),
                *self.site.engine_args]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs = [start_server(port, args, self.log_dir / f"{self.site.name}-{i}.log")
                      for i, port in enumerate(self.ports)]

    def wait_ready(self, timeout_s: float) -> str:
        """Block until every replica answers; the model name they serve. ConfigError when one
        exits or stays silent."""
        names = [wait_ready(url, proc, timeout_s) for url, proc in zip(self.urls(), self.procs, strict=True)]
        return names[0]

    def stop(self, grace_s: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                stop_server(proc, grace_s)
        self.procs = []
