"""llmscale: serve large language models fast, within a budget, under a latency target."""

from __future__ import annotations

from typing import Any

from llmscale import process_env

process_env.apply()  # before torch's first large allocation, which may come from any import

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "llmscale.engine.llm",
    "SamplingParams": "llmscale.engine.sampling_params",
    "RequestOutput": "llmscale.engine.outputs",
    "CompletionOutput": "llmscale.engine.outputs",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import llmscale.config` (and the CLI's --help) does not load the whole engine.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmscale' has no attribute {name!r}")
