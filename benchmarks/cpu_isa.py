"""The C decode kernels built for AVX2 against the same source built for AVX-512, paired.

Both libraries are loaded into one process (`cpu.load` with the flags LLMSCALE_CPU_ISA=avx2
leaves, and with this CPU's own) and called in turn, A B A B ..., on the same inputs: all
decoder linears of SmolLM2-135M (30 layers: qkv 960, o 576, gate-up 3072, down 576 outputs;
hidden 576, intermediate 1536) and its lm_head (49,152 x 576), at decode row counts, with fp32
and bf16 weights, row-major (`matmul_dense`) and in panels (`matmul_panels`, the gate-up
panels yielding SwiGLU as the fused decode step multiplies them); then `paged_decode_attention`
over a bf16 and an fp32 cache. Prints the median and min of each build and the ratio of medians.

    .venv/bin/python benchmarks/cpu_isa.py [--rows 1 8 32] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from llmscale.config import cpu_flags, flags_at_isa
from llmscale.kernels import cpu

HIDDEN, INTER, VOCAB, LAYERS = 576, 1536, 49152, 30
HQ, HKV, HEAD_DIM, BLOCK = 9, 3, 64, 16
LINEARS = [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]  # (out, in)


def _paired(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm up: pages touched, threads started
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _decoder_linears(dtype: torch.dtype) -> list[list[torch.Tensor]]:
    torch.manual_seed(0)
    return [[(torch.randn(n, k) * k ** -0.5).to(dtype) for n, k in LINEARS] for _ in range(LAYERS)]


def _dense(lib, xs: dict[int, torch.Tensor], weights: list[list[torch.Tensor]],
           rows: int) -> Callable[[], None]:
    threads = torch.get_num_threads()

    def run() -> None:
        for layer in weights:
            for w in layer:
                n, k = w.shape
                x, y = xs[k][:rows], torch.empty(rows, n)
                fn = lib.matmul_f32 if w.dtype == torch.float32 else lib.matmul_bf16
                fn(x.data_ptr(), rows, k, w.data_ptr(), n, y.data_ptr(), threads)
    return run


def _panels(lib, xs: dict[int, torch.Tensor], packed: list[list[tuple[torch.Tensor, int, int]]],
            rows: int) -> Callable[[], None]:
    threads = torch.get_num_threads()

    def run() -> None:
        for layer in packed:
            for p, n, swiglu in layer:
                k = p.shape[1]
                x, y = xs[k][:rows], torch.empty(rows, n // 2 if swiglu else n)
                fn = lib.matmul_panels_bf16 if p.dtype == torch.bfloat16 else lib.matmul_panels_f32
                fn(x.data_ptr(), rows, k, p.data_ptr(), n, y.data_ptr(), swiglu, threads)
    return run


def _attention(lib, batch: int, context: int, dtype: torch.dtype) -> Callable[[], None]:
    torch.manual_seed(1)
    need = -(-context // BLOCK)
    k_cache = torch.randn(batch * need, BLOCK, HKV, HEAD_DIM).to(dtype)
    v_cache = torch.randn(batch * need, BLOCK, HKV, HEAD_DIM).to(dtype)
    tables = torch.randperm(batch * need).view(batch, need)
    lens, q = torch.full((batch,), context), torch.randn(batch, HQ, HEAD_DIM)
    out, threads = torch.empty_like(q), torch.get_num_threads()

    def run() -> None:
        for _ in range(LAYERS):
            lib.paged_decode_attention(q.data_ptr(), batch, HQ, HKV, HEAD_DIM, k_cache.data_ptr(),
                                       v_cache.data_ptr(), int(dtype == torch.bfloat16), BLOCK,
                                       tables.data_ptr(), need, lens.data_ptr(), HEAD_DIM ** -0.5,
                                       out.data_ptr(), threads)
    return run


def _matmuls(libs: dict, xs: dict[int, torch.Tensor], dtype: torch.dtype, row_counts: list[int],
             repeats: int) -> None:
    name = "fp32" if dtype == torch.float32 else "bf16"
    weights = _decoder_linears(dtype)
    head = [[(torch.randn(VOCAB, HIDDEN) * 0.04).to(dtype)]]
    packed = [[(cpu.pack_swiglu_panels(w) if i == 2 else cpu.pack_panels(w), w.shape[0], int(i == 2))
               for i, w in enumerate(layer)] for layer in weights]
    for rows in row_counts:
        cases = {f"matmul_dense {name} decoder": {
                     n: _dense(lib, xs, weights, rows) for n, lib in libs.items()},
                 f"matmul_panels {name} decoder": {
                     n: _panels(lib, xs, packed, rows) for n, lib in libs.items()},
                 f"matmul_dense {name} lm_head": {
                     n: _dense(lib, xs, head, rows) for n, lib in libs.items()}}
        for label, fns in cases.items():
            _report(f"{label}, {rows:2d} rows", _paired(fns, repeats))


def _report(label: str, times: dict[str, list[float]]) -> None:
    (a, ta), (b, tb) = times.items()
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(f"{label:38s} {a} {ma * 1e3:8.2f} ms (min {min(ta) * 1e3:7.2f})   "
          f"{b} {mb * 1e3:8.2f} ms (min {min(tb) * 1e3:7.2f})   {b}/{a} {mb / ma:5.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args()
    native = cpu_flags()
    libs = {"avx2": cpu.load(flags_at_isa(native, "avx2")), "avx512": cpu.load(native)}
    if libs["avx512"].vector_bits() != 512:
        raise SystemExit("this CPU (or LLMSCALE_CPU_ISA) has no AVX-512: nothing to compare")
    print(f"{torch.get_num_threads()} threads; decoder: all linears of SmolLM2-135M's {LAYERS} layers")
    xs = {k: torch.randn(max(args.rows), k) for k in (HIDDEN, INTER)}
    for dtype in (torch.float32, torch.bfloat16):
        _matmuls(libs, xs, dtype, args.rows, args.repeats)
    for dtype in (torch.bfloat16, torch.float32):
        name = "fp32" if dtype == torch.float32 else "bf16"
        for batch in (1, 8):
            for context in args.contexts:
                _report(f"attention {name} cache, {batch} x {context} tokens",
                        _paired({n: _attention(lib, batch, context, dtype) for n, lib in libs.items()},
                                args.repeats))


if __name__ == "__main__":
    main()
