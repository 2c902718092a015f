"""Who runs this step, and with how many tokens.

`Scheduler` is continuous (iteration-level) batching in the vLLM v1 style: every step spends a
token budget, running requests first (one token per decode, a chunk per unfinished prefill),
then admits waiting requests FCFS while budget, sequence slots and KV blocks last. When blocks
run out the newest running request is preempted and later recomputed from scratch (its prefix
may still be in the cache).

`StaticScheduler` and `DynamicScheduler` are the request-level baselines: they gather a batch,
then run it to completion before admitting anyone else.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmscale.config import SchedulerConfig
from llmscale.engine.kv_cache import KVCacheManager
from llmscale.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, num_new_tokens)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def shapes(self) -> list[tuple[int, int, bool]]:
        """Per scheduled request (tokens already computed, tokens computed now, whether it then
        samples): what a step's time depends on (the planner's `Chunk`)."""
        return [(r.num_computed_tokens, n, r.num_computed_tokens + n == r.num_tokens)
                for r, n in self.scheduled]

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: what "now" is (wall time; a simulator passes its own)."""
        self.config = config
        self.kv = kv
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Ids of requests in a micro-batch still in the pipeline (`parallel/pipeline.py`): left
        # out of the next micro-batch, since their next token is not known yet, and never
        # preempted, since their blocks are still being written.
        self.in_flight: set[str] = set()
        # Micro-batches the running requests are spread over (a pipeline's depth): each takes at
        # most its share of them, so while one is in flight the next has requests to run.
        self.micro_batches = 1
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
            self.kv.free(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED_ABORTED

    def finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        self.kv.free(request)

    def _preempt(self, request: Request, batch: ScheduledBatch) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        batch.preempted.append(request)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        share = -(-len(self.running) // self.micro_batches)
        for request in list(self.running):
            if request not in self.running:
                continue  # preempted earlier in this loop
            if request.request_id in self.in_flight:
                continue
            if len(batch.scheduled) >= share:
                break
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while not self.kv.allocate_slots(request, num_new):
                # The newest running request not in flight: `request` itself at the latest.
                victim = next(r for r in reversed(self.running) if r.request_id not in self.in_flight)
                self._preempt(victim, batch)
                if victim is request:
                    break
            else:
                batch.scheduled.append((request, num_new))
                budget -= num_new
            if budget <= 0:
                break
        return budget

    def _admit(self, request: Request, batch: ScheduledBatch, budget: int) -> int | None:
        """Try to start a waiting request; returns the remaining budget, or None if it can't."""
        computed_blocks, num_computed = self.kv.get_computed_blocks(request)
        num_new = request.num_tokens - num_computed
        if not self.config.enable_chunked_prefill and num_new > budget:
            return None
        num_new = min(num_new, budget)
        request.num_computed_tokens = num_computed
        if not self.kv.allocate_slots(request, num_new, computed_blocks):
            request.num_computed_tokens = 0
            return None
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_computed
        if request.times.first_scheduled_s is None:
            request.times.first_scheduled_s = self.clock()
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        batch.scheduled.append((request, num_new))
        return budget - num_new

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        if batch.preempted:
            return batch  # out of blocks: admitting more would only thrash
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            remaining = self._admit(self.waiting[0], batch, budget)
            if remaining is None:
                break
            self.waiting.popleft()
            budget = remaining
        return batch


class StaticScheduler(Scheduler):
    """Request-level batching: wait for `static_batch_size` requests (or `batch_timeout_s`
    after the oldest arrived), then run that batch to completion before admitting more."""

    def target_batch_size(self) -> int:
        return min(self.config.static_batch_size, self.config.max_num_seqs)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        if self.running:
            self._schedule_running(batch, self.config.max_num_batched_tokens)
            return batch
        if not self.waiting:
            return batch
        waited = self.clock() - self.waiting[0].arrival_time_s
        if len(self.waiting) < self.target_batch_size() and waited < self.config.batch_timeout_s:
            return batch
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) < self.target_batch_size():
            # The whole batch is admitted now; prefills beyond the budget continue next steps.
            remaining = self._admit(self.waiting[0], batch, budget)
            if remaining is None:
                break
            self.waiting.popleft()
            budget = remaining
        batch.scheduled = [(r, n) for r, n in batch.scheduled if n > 0]
        return batch


class DynamicScheduler(StaticScheduler):
    """Request-level batching whose batch size follows the arrival rate: when idle, take all
    that waited (up to max_num_seqs) once the queue is full or the oldest waited
    `batch_timeout_s`, so a slow trickle gives small batches and a flood big ones."""

    def target_batch_size(self) -> int:
        return self.config.max_num_seqs


def make_scheduler(config: SchedulerConfig, kv: KVCacheManager,
                   clock: Callable[[], float] = time.monotonic) -> Scheduler:
    cls = {"continuous": Scheduler, "static": StaticScheduler, "dynamic": DynamicScheduler}[config.batching]
    return cls(config, kv, clock)
