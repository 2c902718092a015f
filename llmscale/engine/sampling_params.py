"""Per-request sampling settings, shaped like vLLM's `SamplingParams` so its users feel at home."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from llmscale.config import ConfigError

# vLLM's threshold: below it a temperature means argmax, and dividing by it would overflow fp32.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None  # a list[str] after __post_init__
    stop_token_ids: list[int] | None = None  # a list after __post_init__
    max_tokens: int | None = 16  # None: until the context window ends
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token, besides the sampled one
    # top-N logprobs per prompt token, besides the actual one (the first token has none)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids or []]
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (off) or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be >= 1 or None, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
            ("" not in (self.stop or []), f"stop strings must be non-empty, got {self.stop!r}"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def for_sample(self, index: int) -> SamplingParams:
        """The params of sample `index` of n: one sample, seeded `seed + index`, which wraps
        around past SEED_MAX so that every seed's n samples can be seeded."""
        if self.n == 1:
            return self
        seed = self.seed
        if seed is not None:
            seed = seed + index if seed + index <= SEED_MAX else seed + index - 2**64
        return replace(self, n=1, seed=seed)

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
