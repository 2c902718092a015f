"""All-reduce between local tensor-parallel ranks: gloo against shared memory (parallel/shm.py).

    python benchmarks/allreduce.py [--ranks 2] [--hidden 576] [--iters 300]

Each rank is a process with one thread (as a tensor-parallel rank on this machine's cores),
joined by a gloo group; for each size (rows of `hidden` values: a decode batch up to a prefill
chunk) and dtype, both all-reduces run `iters` times, alternated in blocks of 20, and rank 0
prints the median microseconds per call and the ratio. The CPU is named above the table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROWS = (1, 8, 32, 128, 512)
BLOCK = 20


def _rank(rank: int, args: argparse.Namespace, port: int) -> None:
    from llmscale.config import cpu_model_name
    from llmscale.parallel.shm import ShmAllReduce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks)
    shm = ShmAllReduce(rank, args.ranks, max(ROWS) * args.hidden * 4, lambda: None)
    if rank == 0:
        print(f"{cpu_model_name()}; {args.ranks} ranks, one thread each; median of {args.iters} calls")
        print(f"{'rows x hidden':>14s} {'dtype':>9s} {'gloo us':>9s} {'shm us':>9s} {'ratio':>7s}")
    for dtype in (torch.float32, torch.bfloat16):
        for rows in ROWS:
            t = torch.randn(rows, args.hidden).to(dtype)
            times: dict[str, list[float]] = {"gloo": [], "shm": []}
            calls = {"gloo": dist.all_reduce, "shm": shm}
            for _ in range(args.iters // BLOCK):
                for name, call in calls.items():
                    dist.barrier()
                    for _ in range(BLOCK):
                        start = time.perf_counter()
                        call(t)
                        times[name].append(time.perf_counter() - start)
            if rank == 0:
                g, s = (statistics.median(times[n]) * 1e6 for n in ("gloo", "shm"))
                print(f"{rows:>8d} x {args.hidden} {str(dtype)[6:]:>9s} {g:9.1f} {s:9.1f} {g / s:6.1f}x")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    from llmscale.serve.process import free_port

    mp.spawn(_rank, args=(args, free_port()), nprocs=args.ranks)


if __name__ == "__main__":
    main()
