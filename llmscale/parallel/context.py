"""Context parallelism: a long prefill chunk split over C ranks, with ring attention.

Every rank holds the whole model and a whole KV cache, and gets every step's delta. A prefill
chunk of at least `min_tokens` tokens is cut into C contiguous parts, one per rank; everything
else in the step (decodes, shorter chunks) runs whole on every rank, so every cache stays
complete and decode-only steps need no communication at all. In each layer a rank computes
its part's queries, keys and values, then passes K/V around the ring: at each turn it sends the
part it holds to the next rank while it receives the previous rank's, and attends its queries
to the part it holds (its own causally, earlier parts fully, later parts not at all), merging
the partial results exactly through their log-sum-exps. Each part that passes is written into
the rank's cache, so after the chunk every rank holds all of its K/V. At the end of the step
the ranks send their parts' hidden states to rank 0, which samples.
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


@dataclass
class RingChunk:
    """One split prefill chunk, as one rank sees it (`AttentionMetadata.prefills[i].ring`)."""

    context: ContextParallel
    sizes: list[int]  # every rank's part
    part_slots: list[torch.Tensor]  # every part's cache slots
    earlier: int  # tokens of the request's context before the chunk (in the cache already)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, block_table: torch.Tensor, scale: float,
               gather: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
        """q: [n, Hq, D], k/v: [n, Hkv, D] of this rank's part (already in its cache) -> [n, Hq, D].
        `gather(cache, block_table, buffer name)` reads cached tokens as [L, Hkv, D]."""
        ring = self.context
        group = q.shape[1] // k.shape[1]
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        out = lse = None

        def merge(keys: torch.Tensor, values: torch.Tensor, causal: bool) -> None:
            nonlocal out, lse
            kh = keys.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0).to(q.dtype)  # [1, Hq, L, D]
            vh = values.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0).to(q.dtype)
            o, s = _attention_with_lse(qh, kh, vh, 0.0, causal, scale=scale)[:2]
            if out is None:
                out, lse = o.float(), s
                return
            total = torch.logaddexp(lse, s)
            out = out * (lse - total).exp().unsqueeze(-1) + o.float() * (s - total).exp().unsqueeze(-1)
            lse = total

        if self.earlier:
            keys = gather(k_cache, block_table, "k")[:self.earlier]
            merge(keys, gather(v_cache, block_table, "v")[:self.earlier], False)
        held = torch.stack((k, v))  # [2, n, Hkv, D]: what this rank passes on first
        for turn in range(ring.size):
            source = (ring.rank - turn) % ring.size  # whose part `held` is
            incoming = None
            if turn < ring.size - 1:
                nxt = (source - 1) % ring.size
                incoming = torch.empty((2, self.sizes[nxt], *k.shape[1:]), dtype=k.dtype)
                pending = ring.exchange(held, incoming)
            if turn:
                slots = self.part_slots[source]
                k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, held[0].to(k_cache.dtype))
                v_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, held[1].to(v_cache.dtype))
            if source <= ring.rank:
                merge(held[0], held[1], causal=source == ring.rank)
            if incoming is not None:
                ring.wait(pending)
                held = incoming
        return out.squeeze(0).transpose(0, 1).to(q.dtype)


@dataclass
class SplitChunk:
    """Where a split chunk's parts sit: in the whole batch's rows and in this rank's."""

    full_start: int
    local_start: int
    sizes: list[int]


class ContextParallel:
    """This rank's place among the C context-parallel ranks and its transfers to them."""

    def __init__(self, parallel: ParallelConfig, rank: int) -> None:
        self.rank, self.size = rank, parallel.context_parallel_size
        self.min_tokens = max(parallel.context_parallel_min_tokens, self.size)
        self.next, self.prev = (rank + 1) % self.size, (rank - 1) % self.size

    def split(self, n: int, slots: torch.Tensor, earlier: int, full_start: int, local_start: int
              ) -> tuple[slice, RingChunk, SplitChunk] | None:
        """A prefill chunk of `n` tokens (cache `slots`, after `earlier` tokens of context) at
        row `full_start` of the whole batch and `local_start` of this rank's: this rank's part
        of its tokens, how that part attends, and where every part sits; None when it runs
        whole."""
        if n < self.min_tokens:
            return None
        sizes = split_sizes(n, self.size)
        first = sum(sizes[:self.rank])
        ring = RingChunk(self, sizes, list(slots.split(sizes)), earlier)
        return slice(first, first + sizes[self.rank]), ring, SplitChunk(full_start, local_start, sizes)

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
            mine = torch.cat([hidden[s.local_start:s.local_start + s.sizes[self.rank]] for s in splits])
            dist.send(mine.contiguous(), 0)
            return None
        full = hidden.new_empty(full_rows, hidden.shape[1])
        parts = [torch.empty(sum(s.sizes[r] for s in splits), hidden.shape[1], dtype=hidden.dtype)
                 for r in range(1, self.size)]
        works = [dist.irecv(p, r) for r, p in enumerate(parts, start=1)]
        local = full_pos = 0  # copy the rows rank 0 ran, in order, around the parts it did not
        for s in splits:
            length = s.local_start - local  # unsplit rows before the chunk: as many in both
            full[full_pos:full_pos + length] = hidden[local:local + length]
            full[s.full_start:s.full_start + s.sizes[0]] = hidden[s.local_start:s.local_start + s.sizes[0]]
            local, full_pos = s.local_start + s.sizes[0], s.full_start + sum(s.sizes)
        full[full_pos:] = hidden[local:]
        for w in works:
            w.wait()
        for r, received in enumerate(parts, start=1):
            offset = 0
            for s in splits:
                start = s.full_start + sum(s.sizes[:r])
                full[start:start + s.sizes[r]] = received[offset:offset + s.sizes[r]]
                offset += s.sizes[r]
        return full
