"""What a worker rank needs of each step, sent as the changes since the last one.

Rank 0 runs the scheduler, the KV block manager and the sampler; the other ranks run the same
model step on their part and must build the same flat batch. Instead of the whole batch each
step (every request's tokens and block table, re-pickled), rank 0 sends a request's prompt
and block table once, then per step only the tokens and blocks appended since, which
requests run and how far, and which it forgot (finished, aborted, preempted: their blocks are
freed, and a preempted request comes back as new), as vLLM v1 and nano-vllm do. Each worker
keeps mirrors of the running requests and hands `ModelRunner.execute` the batch it rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmscale.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from llmscale.engine.kv_cache import KVCacheManager


@dataclass
class NewRequest:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    wants_prompt_logprobs: bool
    block_ids: list[int]


@dataclass
class StepDelta:
    new: list[NewRequest] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=dict)  # appended to known requests
    blocks: dict[str, list[int]] = field(default_factory=dict)  # block ids appended
    scheduled: list[tuple[str, int, int]] = field(default_factory=list)  # (id, computed, new tokens)
    dropped: list[str] = field(default_factory=list)


class DeltaEncoder:
    """Rank 0's record of what the workers know, per request: (tokens sent, blocks sent, the
    request's preemption count then)."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[int, int, int]] = {}

    def encode(self, batch: ScheduledBatch, kv: KVCacheManager) -> StepDelta:
        delta = StepDelta()
        # A request holding no blocks any more finished, was aborted or was preempted.
        delta.dropped = [rid for rid in self.sent if rid not in kv.req_blocks]
        for rid in delta.dropped:
            del self.sent[rid]
        for req, n in batch.scheduled:
            rid = req.request_id
            blocks = kv.block_ids(rid)
            known = self.sent.get(rid)
            if known is None or known[2] != req.num_preemptions:
                delta.new.append(NewRequest(rid, list(req.all_token_ids), req.num_prompt_tokens,
                                            req.prompt_logprobs is not None, blocks))
            else:
                tokens_sent, blocks_sent, _ = known
                if len(req.all_token_ids) > tokens_sent:
                    delta.tokens[rid] = req.all_token_ids[tokens_sent:]
                if len(blocks) > blocks_sent:
                    delta.blocks[rid] = blocks[blocks_sent:]
            self.sent[rid] = (len(req.all_token_ids), len(blocks), req.num_preemptions)
            delta.scheduled.append((rid, req.num_computed_tokens, n))
        return delta


class MirrorRequest:
    """What `ModelRunner.execute` reads of a request, on a worker."""

    __slots__ = ("request_id", "all_token_ids", "num_prompt_tokens", "prompt_logprobs", "num_computed_tokens")

    def __init__(self, new: NewRequest) -> None:
        self.request_id = new.request_id
        self.all_token_ids = list(new.token_ids)
        self.num_prompt_tokens = new.num_prompt_tokens
        self.prompt_logprobs: list[None] | None = [] if new.wants_prompt_logprobs else None
        self.num_computed_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class WorkerState:
    """A worker's mirrors of the running requests and their block tables; `block_ids` is the one
    method of the KV manager the runner calls."""

    def __init__(self) -> None:
        self.requests: dict[str, MirrorRequest] = {}
        self.tables: dict[str, list[int]] = {}

    def apply(self, delta: StepDelta) -> ScheduledBatch:
        for rid in delta.dropped:
            self.requests.pop(rid, None)
            self.tables.pop(rid, None)
        for new in delta.new:
            self.requests[new.request_id] = MirrorRequest(new)
            self.tables[new.request_id] = list(new.block_ids)
        for rid, tokens in delta.tokens.items():
            self.requests[rid].all_token_ids.extend(tokens)
        for rid, blocks in delta.blocks.items():
            self.tables[rid].extend(blocks)
        batch = ScheduledBatch()
        for rid, computed, n in delta.scheduled:
            req = self.requests[rid]
            req.num_computed_tokens = computed
            batch.scheduled.append((req, n))  # type: ignore[arg-type]
        return batch

    def block_ids(self, request_id: str) -> list[int]:
        return self.tables[request_id]
