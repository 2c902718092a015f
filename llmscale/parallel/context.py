"""Context parallelism: a long prefill chunk split over C ranks, with ring attention.

Every rank holds the whole model and a whole KV cache, and gets every step's delta. A prefill
chunk of at least `min_tokens` tokens is cut into 2C near-equal segments, and rank r takes
segments r and 2C-1-r: under a causal mask a late segment attends to far more keys than an
early one, and this pairing gives every rank the same attention work (the load-balanced split
of ring-attention implementations). Everything else in the step (decodes, shorter chunks)
runs whole on every rank, so every cache stays complete and decode-only steps need no
communication at all.

In each layer a rank computes its part's queries, keys and values, then passes K/V around the
ring: at each turn it sends the part it holds to the next rank while it receives the previous
rank's, and attends each of its query segments to each held segment (an earlier segment
fully, its own causally, a later one not at all), merging the partial results exactly through
their log-sum-exps. Each part that passes is written into the rank's cache, so after the chunk
every rank holds all of its K/V. At the end of the step the ranks send their parts' hidden
states to rank 0, which samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmscale.config import ParallelConfig

# The partial attention of a block of queries and the log-sum-exp of each row's scores, which
# exact merging needs; torch's fused CPU kernel returns both ([1, H, L, D] in, lse [1, H, L]).
_attention_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def split_sizes(n: int, parts: int) -> list[int]:
    """`n` tokens cut into `parts` contiguous parts, the first ones a token longer when needed."""
    share, extra = divmod(n, parts)
    return [share + (i < extra) for i in range(parts)]


def rank_segments(n: int, size: int) -> list[list[range]]:
    """Per rank, the two segments of a chunk of `n` tokens it holds (chunk positions, in order)."""
    sizes = split_sizes(n, 2 * size)
    starts = [sum(sizes[:i]) for i in range(2 * size)]
    segment = [range(starts[i], starts[i] + sizes[i]) for i in range(2 * size)]
    return [[segment[r], segment[2 * size - 1 - r]] for r in range(size)]


class _Merged:
    """Attention of one query segment, merged over key blocks through log-sum-exps."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None  # [1, Hq, n, D] fp32
        self.lse: torch.Tensor | None = None  # [1, Hq, n]

    def add(self, o: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = o.float(), lse
            return
        total = torch.logaddexp(self.lse, lse)
        kept, new = (self.lse - total).exp().unsqueeze(-1), (lse - total).exp().unsqueeze(-1)
        self.out = self.out * kept + o.float() * new
        self.lse = total


@dataclass
class RingChunk:
    """One split prefill chunk, as one rank sees it (`PrefillChunk.split`)."""

    context: ContextParallel
    segments: list[list[range]]  # per rank, its two segments of the chunk
    part_slots: list[torch.Tensor]  # per rank, its part's cache slots
    earlier: int  # tokens of the request's context before the chunk (in the cache already)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, block_table: torch.Tensor, scale: float,
               gather: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
        """q: [n, Hq, D], k/v: [n, Hkv, D] of this rank's part (already in its cache) -> [n, Hq, D].
        `gather(cache, block_table, buffer name)` reads cached tokens as [L, Hkv, D]."""
        ring = self.context
        group = q.shape[1] // k.shape[1]
        mine = self.segments[ring.rank]
        bounds = [0, len(mine[0]), len(mine[0]) + len(mine[1])]
        queries = [q[bounds[i]:bounds[i + 1]].transpose(0, 1).unsqueeze(0) for i in range(2)]  # [1, Hq, n, D]
        merged = [_Merged(), _Merged()]

        def attend_block(keys: torch.Tensor, values: torch.Tensor, key_segment: range | None) -> None:
            """Both query segments against one key block (`key_segment` of the chunk, or None
            for the context before it)."""
            if not len(keys):
                return
            kh = keys.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0).to(q.dtype)  # [1, Hq, L, D]
            vh = values.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0).to(q.dtype)
            for segment, qh, into in zip(mine, queries, merged, strict=True):
                if not len(segment) or (key_segment is not None and key_segment.start > segment.start):
                    continue  # empty, or keys after every query: masked out
                causal = key_segment is not None and key_segment.start == segment.start
                into.add(*_attention_with_lse(qh, kh, vh, 0.0, causal, scale=scale)[:2])

        if self.earlier:
            keys = gather(k_cache, block_table, "k")[:self.earlier]
            attend_block(keys, gather(v_cache, block_table, "v")[:self.earlier], None)
        held = torch.stack((k, v))  # [2, n, Hkv, D]: what this rank passes on first
        for turn in range(ring.size):
            source = (ring.rank - turn) % ring.size  # whose part `held` is
            incoming = None
            if turn < ring.size - 1:
                nxt = (source - 1) % ring.size
                incoming = torch.empty((2, sum(map(len, self.segments[nxt])), *k.shape[1:]), dtype=k.dtype)
                pending = ring.exchange(held, incoming)
            if turn:
                slots = self.part_slots[source]
                k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, held[0].to(k_cache.dtype))
                v_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, held[1].to(v_cache.dtype))
            first, second = self.segments[source]
            attend_block(held[0, :len(first)], held[1, :len(first)], first)
            attend_block(held[0, len(first):], held[1, len(first):], second)
            if incoming is not None:
                ring.wait(pending)
                held = incoming
        outs = [m.out.squeeze(0).transpose(0, 1) for m in merged if m.out is not None]
        return torch.cat(outs).to(q.dtype)


@dataclass
class SplitChunk:
    """Where a split chunk's parts sit: in the whole batch's rows and in this rank's."""

    full_start: int
    local_start: int
    parts: list[torch.Tensor]  # per rank, its part's positions in the chunk


class ContextParallel:
    """This rank's place among the C context-parallel ranks and its transfers to them."""

    def __init__(self, parallel: ParallelConfig, rank: int) -> None:
        self.rank, self.size = rank, parallel.context_parallel_size
        self.min_tokens = max(parallel.context_parallel_min_tokens, 2 * self.size)
        self.next, self.prev = (rank + 1) % self.size, (rank - 1) % self.size

    def split(self, n: int, slots: torch.Tensor, earlier: int, full_start: int, local_start: int
              ) -> tuple[torch.Tensor, RingChunk, SplitChunk] | None:
        """A prefill chunk of `n` tokens (cache `slots`, after `earlier` tokens of context) at
        row `full_start` of the whole batch and `local_start` of this rank's: the positions in
        the chunk of this rank's part, how that part attends, and where every part sits; None
        when the chunk runs whole."""
        if n < self.min_tokens:
            return None
        segments = rank_segments(n, self.size)
        parts = [torch.tensor([*first, *second], device=slots.device) for first, second in segments]
        ring = RingChunk(self, segments, [slots[p] for p in parts], earlier)
        return parts[self.rank], ring, SplitChunk(full_start, local_start, parts)

    def exchange(self, send: torch.Tensor, recv: torch.Tensor) -> list[dist.Work]:
        """Send to the next rank and receive from the previous one, both started now."""
        return [dist.isend(send, self.next), dist.irecv(recv, self.prev)]

    def wait(self, works: list[dist.Work]) -> None:
        """Until an exchange is done (what `benchmarks/parallel.py` times as communication)."""
        for work in works:
            work.wait()

    def gather_hidden(self, hidden: torch.Tensor, splits: list[SplitChunk], full_rows: int
                      ) -> torch.Tensor | None:
        """Rank 0: the whole batch's hidden states from every rank's parts; the others send
        theirs and get None."""
        if not splits:
            return hidden if self.rank == 0 else None
        if self.rank:
            mine = torch.cat([hidden[s.local_start:s.local_start + len(s.parts[self.rank])] for s in splits])
            dist.send(mine.contiguous(), 0)
            return None
        received = [hidden.new_empty(sum(len(s.parts[r]) for s in splits), hidden.shape[1])
                    for r in range(1, self.size)]
        works = [dist.irecv(t, r) for r, t in enumerate(received, start=1)]
        full = hidden.new_empty(full_rows, hidden.shape[1])
        local = full_pos = 0  # copy the rows rank 0 ran, in order, around the parts it did not
        for s in splits:
            length = s.local_start - local  # unsplit rows before the chunk: as many in both
            full[full_pos:full_pos + length] = hidden[local:local + length]
            own = len(s.parts[0])
            full.index_copy_(0, s.full_start + s.parts[0], hidden[s.local_start:s.local_start + own])
            local, full_pos = s.local_start + own, s.full_start + sum(len(p) for p in s.parts)
        full[full_pos:] = hidden[local:]
        self.wait(works)
        for r, rows in enumerate(received, start=1):
            offset = 0
            for s in splits:
                count = len(s.parts[r])
                full.index_copy_(0, s.full_start + s.parts[r], rows[offset:offset + count])
                offset += count
        return full
