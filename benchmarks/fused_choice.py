"""Which kernels a bf16 model's decode-only step should run, by batch size: the fused C step
with its bf16 weights read as stored (row-major) or packed in panels, against the per-op path
(oneDNN's bf16 GEMMs), alternated in one engine.

    .venv/bin/python benchmarks/fused_choice.py [--decodes 1,2,4,8,32,64,96] [--context 256] [--repeats 7]

Each step is `LLMEngine.step` of that many decodes placed with their context already cached
(`plan.calibrate.run_shape`); the three variants run in turn, A B C A B C ..., median per
variant. `engine/fused_decode.py`'s BF16_ROW_MAJOR_MAX_ROWS and BF16_ACTIVATIONS_MAX_ROWS come
from these crossovers.
"""

from __future__ import annotations

import argparse
import random
import statistics

from llmscale.bench.profile import PromptSource, corpus_tokens
from llmscale.bench.roofline import Chunk
from llmscale.config import cpu_model_name
from llmscale.console import stdout_console
from llmscale.engine import fused_decode
from llmscale.plan.calibrate import calibration_engine, run_shape

VARIANTS = ("row-major", "panels", "per-op")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decodes", default="1,2,4,5,6,8,16,32,48,64,96,128")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    console = stdout_console()
    engine = calibration_engine(None, "bfloat16", "cpu", 4096)
    runner, fused = engine.runner, engine.runner.fused
    if fused is None:
        raise SystemExit("no fused decode step here: it needs the C kernels and bf16 arithmetic")
    fused.max_rows = 1 << 20  # every batch may take it
    prompts = PromptSource(corpus_tokens(engine.tokenizer), random.Random(0))

    def use(variant: str) -> None:
        runner.fused = None if variant == "per-op" else fused
        fused_decode.BF16_ROW_MAJOR_MAX_ROWS = 1 << 20 if variant == "row-major" else 0

    console.print(f"{cpu_model_name()}; bf16 decode steps at {args.context} tokens of context, ms "
                  f"(median of {args.repeats})")
    for b in (int(x) for x in args.decodes.split(",")):
        shape = [Chunk(args.context, 1, True)] * b
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for v in VARIANTS:  # warm-up
            use(v)
            run_shape(engine, shape, prompts, "warm-up")
        for r in range(args.repeats):
            for v in VARIANTS:
                use(v)
                times[v].append(run_shape(engine, shape, prompts, str(r)) * 1e3)
        cells = "  ".join(f"{v} {statistics.median(t):7.1f}" for v, t in times.items())
        console.print(f"{b:4d} decodes: {cells}", markup=False)


if __name__ == "__main__":
    main()
