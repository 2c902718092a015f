"""Pipeline parallelism: stages of contiguous layers, with micro-batches in flight.

Rank r is tensor-parallel rank r % T of stage r // T (`ParallelConfig.place`). Every rank gets
every step's delta and builds the same flat batch. Stage 0 embeds the tokens and runs its
layers; each later stage receives the residual stream from the rank with its tensor-parallel
index on the stage before, runs its layers and passes it on; the last stage computes the logits
of the rows the step samples and its first rank sends them to rank 0, which samples. The sizes
never travel: each rank knows them from the batch.

Rank 0 (the engine) keeps up to P micro-batches in flight, as vLLM's virtual engines do: it
runs stage 0 of one micro-batch while the later stages run the ones before, and the scheduler
leaves requests in flight out of the next micro-batch (their next token is not known yet). One
request alone is one micro-batch, and the stages take turns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from llmscale.config import ParallelConfig
from llmscale.engine.runner import StepInputs, StepResult, flat_logits

if TYPE_CHECKING:
    from llmscale.engine.kv_cache import KVCacheManager
    from llmscale.engine.runner import ModelRunner
    from llmscale.engine.scheduler import ScheduledBatch
    from llmscale.parallel.step_delta import WorkerState


class StageLink:
    """One rank's point-to-point transfers: the residual stream in from the previous stage and
    out to the next, the last stage's logits to rank 0. A send does not wait for its receiver;
    the next send on the link waits for it, so at most one is outstanding and its tensor lives."""

    def __init__(self, parallel: ParallelConfig, rank: int, hidden_size: int, dtype: torch.dtype,
                 vocab_size: int) -> None:
        stage, self.tp_rank = parallel.place(rank)
        tp, stages = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        self.prev = rank - tp if stage > 0 else None
        self.next = rank + tp if stage < stages - 1 else None
        self.last_stage_head = (stages - 1) * tp  # the last stage's first rank: it holds the logits
        self.hidden_size, self.dtype, self.vocab_size = hidden_size, dtype, vocab_size
        self.sending: tuple[dist.Work, torch.Tensor] | None = None

    def recv_hidden(self, num_tokens: int) -> torch.Tensor:
        assert self.prev is not None
        hidden = torch.empty(num_tokens, self.hidden_size, dtype=self.dtype)
        dist.recv(hidden, src=self.prev)
        return hidden

    def send_hidden(self, hidden: torch.Tensor) -> None:
        assert self.next is not None
        self._send(hidden, self.next)

    def send_logits(self, logits: torch.Tensor) -> None:
        self._send(logits, 0)

    def recv_logits(self, rows: int) -> torch.Tensor:
        logits = torch.empty(rows, self.vocab_size, dtype=torch.float32)
        dist.recv(logits, src=self.last_stage_head)
        return logits

    def _send(self, t: torch.Tensor, dst: int) -> None:
        self.flush()
        t = t.contiguous()
        self.sending = (dist.isend(t, dst), t)

    def flush(self) -> None:
        """Wait until the outstanding send, if any, is done."""
        if self.sending is not None:
            self.sending[0].wait()
            self.sending = None


@torch.inference_mode()
def run_stage(runner: ModelRunner, batch: ScheduledBatch, state: WorkerState, link: StageLink) -> None:
    """A worker rank's part of one micro-batch, in the order the micro-batches were launched."""
    inputs = runner.prepare(batch, state)  # type: ignore[arg-type]
    hidden = None if link.prev is None else link.recv_hidden(len(inputs.input_ids))
    hidden = runner.run_model(inputs, hidden)
    if link.next is not None:
        link.send_hidden(hidden)
        return
    logits = flat_logits(runner.logits(inputs, hidden))  # every rank of the stage gathers
    if link.tp_rank == 0 and logits is not None:
        link.send_logits(logits)


@dataclass
class Flight:
    """A micro-batch rank 0 has launched and not yet collected."""

    batch: ScheduledBatch
    inputs: StepInputs
    launched_s: float


class PipelineDriver:
    """Rank 0's side: launch micro-batches through stage 0, collect their logits in order."""

    def __init__(self, runner: ModelRunner, link: StageLink, depth: int) -> None:
        self.runner, self.link, self.depth = runner, link, depth
        self.in_flight: deque[Flight] = deque()

    @property
    def full(self) -> bool:
        return len(self.in_flight) >= self.depth

    def launch(self, batch: ScheduledBatch, kv: KVCacheManager, now_s: float) -> None:
        with torch.inference_mode():
            inputs = self.runner.prepare(batch, kv)
            self.link.send_hidden(self.runner.run_model(inputs))
        self.in_flight.append(Flight(batch, inputs, now_s))

    def collect(self) -> tuple[Flight, StepResult]:
        """The oldest micro-batch and its logits, once the last stage has sent them."""
        flight = self.in_flight.popleft()
        rows = flight.inputs.num_logit_rows
        logits = self.link.recv_logits(rows) if rows else torch.empty(0, self.link.vocab_size)
        return flight, flight.inputs.split_logits(logits)
