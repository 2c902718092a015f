"""What the engine hands back, shaped like vLLM's `RequestOutput` so its users feel at home."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # Per generated token: {token_id: logprob} holding the sampled token and the top-N.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that fired

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_s: float
    first_scheduled_s: float | None
    first_token_s: float | None
    last_token_s: float | None
    finished_s: float | None
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    # With `prompt_logprobs`: per prompt token {token_id: logprob}, None for the first one.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # The engine replica that produced it, where several serve one endpoint; None for one engine.
    served_by: str | None = None
    # The model that produced it, where it is not the endpoint's own (a cluster's fallback).
    served_model: str | None = None
