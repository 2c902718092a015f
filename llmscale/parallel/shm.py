"""All-reduce between the tensor-parallel ranks of one machine through shared memory.

gloo all-reduces over TCP sockets, even between processes on one machine: each call pays a few
round trips through the kernel, twice per layer. vLLM CPU all-reduces through shared memory
instead, and so does this: one segment in /dev/shm holds, per rank, a line of two flags (ready,
done) and a buffer. A call with sequence number s: wait until every rank is done with call s-1
(its buffer may be overwritten), copy this rank's tensor into its buffer, publish ready = s,
wait until every rank is ready, sum all buffers in rank order (the same bits on every rank),
publish done = s. The steps are C (`kernels/cpu.c`: spin-waits with acquire loads, the sum);
between spins of `CHECK_EVERY_US` a rank checks that its peers live, so a dead rank fails the
call within seconds instead of hanging it. BENCHMARKS.md has gloo against this.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from llmscale.kernels import cpu as cpu_kernels

LINE = 64  # bytes of flags per rank: a cache line of its own
READY, DONE = 0, 1
CHECK_EVERY_US = 1_000_000


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class ShmAllReduce:
    """`all_reduce(t)` in place for fp32 or bf16 tensors of up to `max_bytes`; others go to
    torch.distributed. Every rank of `group` (default: the default process group) constructs
    it, together; `rank` and `world_size` are within the group."""

    def __init__(self, rank: int, world_size: int, max_bytes: int, check_peers: Callable[[], None],
                 group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self.max_bytes = max_bytes
        self.stride = LINE + _round_up(max_bytes, LINE)
        self.check_peers = check_peers
        self.lib = cpu_kernels.library()
        name = [f"/dev/shm/llmscale-tp-{os.getpid()}-{id(self):x}" if rank == 0 else None]
        dist.broadcast_object_list(name, group=group, group_src=0)
        path = name[0]
        if rank == 0:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, self.stride * world_size)
        dist.barrier(group=group)
        if rank != 0:
            fd = os.open(path, os.O_RDWR)
        self.segment = mmap.mmap(fd, self.stride * world_size)
        os.close(fd)
        dist.barrier(group=group)  # every rank has it mapped: the name can go
        if rank == 0:
            os.unlink(path)
        whole = torch.frombuffer(self.segment, dtype=torch.uint8)
        self.base = whole.data_ptr()
        self.mine = whole[rank * self.stride + LINE:(rank + 1) * self.stride]
        self.seq = 0

    def _wait(self, which: int, target: int) -> None:
        while self.lib.shm_wait(self.base, self.stride, self.world_size, which, target, CHECK_EVERY_US):
            self.check_peers()

    def __call__(self, t: torch.Tensor) -> None:
        fits = t.nbytes <= self.max_bytes and t.is_contiguous()
        if t.dtype not in (torch.float32, torch.bfloat16) or not fits:
            dist.all_reduce(t, group=self.group)
            return
        self.seq += 1
        line = self.base + self.rank * self.stride
        self._wait(DONE, self.seq - 1)
        self.mine[:t.nbytes].view(t.dtype).copy_(t.view(-1))
        self.lib.shm_publish(line, READY, self.seq)
        self._wait(READY, self.seq)
        self.lib.shm_sum(self.base + LINE, self.stride, self.world_size, t.numel(),
                         int(t.dtype == torch.bfloat16), t.data_ptr())
        self.lib.shm_publish(line, DONE, self.seq)
