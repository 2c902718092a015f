"""Where llmscale keeps what it builds once per machine: converted models and compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$LLMSCALE_CACHE`, else ~/.cache/llmscale."""
    env = os.environ.get("LLMSCALE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmscale"
