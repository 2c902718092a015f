"""A request and its state machine: WAITING -> RUNNING -> FINISHED_*, with PREEMPTED -> WAITING."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from llmscale.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class RequestTimes:
    """Wall-clock stamps (time.monotonic seconds) for latency metrics."""

    arrival_s: float
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None


@dataclass(eq=False)  # a request is itself, not its fields: `in` and `remove` compare identity
class Request:
    request_id: str  # unique among the engine's live requests: the KV cache's key
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # already capped by the context window
    eos_token_ids: tuple[int, ...] = ()
    arrival_time_s: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # How many of all_token_ids have their KV in the cache; a request whose computed tokens lag
    # its prompt is in prefill.
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    output_text: str = ""
    logprobs: list[dict[int, float]] | None = None
    # Index i holds token i's logprob given tokens < i (and the top-N); the first is None.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    sampled_logprobs: list[float] = field(default_factory=list)
    # The caller's request this is one of `n` samples of, and which one; None: it is its own.
    parent_id: str | None = None
    index: int = 0
    times: RequestTimes = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.times = RequestTimes(arrival_s=self.arrival_time_s)
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed)
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def group_id(self) -> str:
        """The caller's request id, which its outputs carry."""
        return self.request_id if self.parent_id is None else self.parent_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
