"""Decode steps of the default model by path, alternated in one process.

    python benchmarks/decode_attention.py [--dtype auto] [--repeats 5]

Each step shape (a batch of decodes at given contexts) is placed in a real engine's running
batch and one `LLMEngine.step` is timed, as `llmscale profile --calibrate` does, alternating:

  fused      every layer in one C call (`engine/fused_decode.py`), up to its row limit
  in place   the model's modules; decodes read the paged cache in place in the C kernel, each
             over its own context
  gathered   the model's modules; each decode's blocks gathered into a batch padded to the
             longest context, one masked SDPA call

The printed table gives each path's median step and the ratios; the CPU is named above it.
"""

from __future__ import annotations

import argparse
import random
import statistics

from llmscale.bench.profile import PromptSource, corpus_tokens
from llmscale.bench.roofline import Chunk
from llmscale.config import cpu_model_name
from llmscale.plan.calibrate import calibration_engine, run_shape


def shapes() -> dict[str, list[Chunk]]:
    rng = random.Random(1)
    tail = [min(1447, int(rng.lognormvariate(5.5, 0.6))) for _ in range(31)] + [1447]
    return {
        "1 x 128": [Chunk(128, 1, True)],
        "8 x 256": [Chunk(256, 1, True)] * 8,
        "32 x 256": [Chunk(256, 1, True)] * 32,
        "32 x 1024": [Chunk(1024, 1, True)] * 32,
        f"32, mean {sum(tail) // len(tail)}, longest 1447": [Chunk(c, 1, True) for c in tail],
        "48 x 330": [Chunk(330, 1, True)] * 48,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    engine = calibration_engine(None, args.dtype, None, 2048)
    runner = engine.runner
    if not runner.decode_in_place:
        raise SystemExit("decodes cannot read the cache in place here (no C kernels, or a GPU)")
    fused = runner.fused
    print(f"{cpu_model_name()}; weights {engine.dtype}, KV cache {runner.kv_dtype}; median of {args.repeats} "
          f"steps")
    prompts = PromptSource(corpus_tokens(engine.tokenizer), random.Random(0))
    run_shape(engine, [Chunk(128, 1, True)], prompts, "warm-up")
    print(f"{'decodes x context':34s} {'fused ms':>10s} {'in place ms':>12s} {'gathered ms':>12s} "
          f"{'in place / fused':>17s} {'gathered / in place':>20s}")
    for name, shape in shapes().items():
        paths = {"in place": (None, True), "gathered": (None, False)}
        if fused is not None and len(shape) <= fused.max_rows:
            paths = {"fused": (fused, True), **paths}
        times: dict[str, list[float]] = {path: [] for path in paths}
        for r in range(args.repeats):
            for path, (runner.fused, runner.decode_in_place) in paths.items():
                times[path].append(run_shape(engine, shape, prompts, f"{name}-{r}-{path}"))
        ms = {path: statistics.median(t) * 1e3 for path, t in times.items()}
        fused_ms = f"{ms['fused']:.1f}" if "fused" in ms else "-"
        gain = f"{ms['in place'] / ms['fused']:.2f}x" if "fused" in ms else "-"
        print(f"{name:34s} {fused_ms:>10s} {ms['in place']:12.1f} {ms['gathered']:12.1f} {gain:>17s} "
              f"{ms['gathered'] / ms['in place']:19.2f}x")


if __name__ == "__main__":
    main()
