"""What the OpenAI API needs of an engine, so one API serves one engine or a cluster of them.

`AsyncLLMEngine` (one engine in this process) and `cluster.client.ClusterEngineClient` (engine
replicas on Ray Serve) both fit it. The API tokenizes chat prompts, checks lengths against
the context window, and exports each engine's state as metrics; everything else happens in
`generate`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from llmscale.engine.llm_engine import EngineState
from llmscale.engine.outputs import RequestOutput
from llmscale.engine.sampling_params import SamplingParams
from llmscale.model.tokenizer import Tokenizer


class EngineClient(Protocol):
    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def is_running(self) -> bool: ...

    def generate(self, prompt: Any, params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs as tokens arrive, the last one `finished`; raises `ConfigError` for a
        request the engine refuses and `EngineDeadError` when no engine can serve. Leaving the
        iterator early aborts the request."""
        ...

    def states(self) -> dict[str, EngineState]:
        """Each engine's state by replica id ("" for the one engine of a single server)."""
        ...
