"""What a request cost, in USD: from per-token list prices, or from the hardware's hourly price.

With `hardware_cost_per_hour` the price of a token follows measured throughput: the server's
cost per busy second divided by the output tokens it makes per busy second. Busy time already
contains the prefills, so output tokens carry the whole bill and input tokens cost nothing
extra; the more requests share a step, the cheaper each token gets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmscale.config import ConfigError


@dataclass
class CostModel:
    price_input_per_1m: float = 0.0
    price_output_per_1m: float = 0.0
    hardware_cost_per_hour: float | None = None
    busy_s: float = 0.0
    output_tokens: int = 0
    _in_flight: int = 0
    _busy_since: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        prices = (self.price_input_per_1m, self.price_output_per_1m, self.hardware_cost_per_hour or 0.0)
        if min(prices) < 0:
            raise ConfigError("prices must be >= 0")
        if self.hardware_cost_per_hour is not None and (self.price_input_per_1m or self.price_output_per_1m):
            raise ConfigError("give either --hardware-cost-per-hour or per-token prices, not both")

    def request_started(self) -> None:
        if self._in_flight == 0:
            self._busy_since = time.monotonic()
        self._in_flight += 1

    def request_finished(self, output_tokens: int) -> None:
        self._in_flight -= 1
        self.output_tokens += output_tokens
        if self._in_flight == 0:
            self.busy_s += time.monotonic() - self._busy_since

    def _busy_now_s(self) -> float:
        ongoing = time.monotonic() - self._busy_since if self._in_flight else 0.0
        return self.busy_s + ongoing

    @property
    def output_tokens_per_s(self) -> float | None:
        busy = self._busy_now_s()
        return self.output_tokens / busy if busy > 0 and self.output_tokens else None

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        if self.hardware_cost_per_hour is None:
            return (prompt_tokens * self.price_input_per_1m
                    + completion_tokens * self.price_output_per_1m) / 1e6
        tps = self.output_tokens_per_s
        return 0.0 if tps is None else completion_tokens * self.hardware_cost_per_hour / 3600 / tps
