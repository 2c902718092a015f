"""Step time at tensor-parallel sizes 1 and 2 on this machine's cores, split into compute and
communication.

    python benchmarks/tensor_parallel.py [--model DIR] [--dtype auto] [--repeats 5] [--sizes 1,2]
                                         [--backend mp|ray] [--no-planner]

The default model's 9 attention heads do not split over 2 ranks, so by default the model is
Qwen2.5-0.5B's shape (hidden 896, 14 query and 2 KV heads, MLP 4864, 24 layers) with SmolLM2's
vocabulary and tokenizer and random weights, written once to results/tp-model (the same FLOPs
and bytes per token as the real one, whose weights cannot be fetched here). For each size an
engine is built with the same cores in total (size 1: one process with every core; size 2: two
processes with half each). Each step shape (decode batches
at 256 tokens of context, prefill chunks) is placed in the running batch and one
`LLMEngine.step` is timed on rank 0, as `llmscale profile --calibrate` does, with the time rank 0
spends in all-reduces (including waiting for the other rank to arrive) and in sending the
step's delta to the workers. Printed: the median step, its all-reduce and delta parts, and the
rest (compute, scheduling, sampling).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmscale.bench.profile import PromptSource, corpus_tokens
from llmscale.bench.roofline import Chunk
from llmscale.config import cpu_model_name
from llmscale.plan.calibrate import run_shape

SHAPES = {
    "decode 1 x 256": [Chunk(256, 1, True)],
    "decode 8 x 256": [Chunk(256, 1, True)] * 8,
    "decode 32 x 256": [Chunk(256, 1, True)] * 32,
    "prefill 128": [Chunk(0, 128, True)],
    "prefill 512": [Chunk(0, 512, True)],
}


class Timer:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call, self.seconds = call, 0.0

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.call(*args)
        finally:
            self.seconds += time.perf_counter() - start


QWEN_05B_SHAPE = dict(architectures=["Qwen2ForCausalLM"], hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      rope_theta=1000000.0, tie_word_embeddings=True, vocab_size=49152,
                      max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def random_model(out: Path) -> Path:
    """Qwen2.5-0.5B's shape with random weights and SmolLM2's tokenizer (see the docstring)."""
    if (out / "config.json").is_file():
        return out
    import shutil

    import torch
    import transformers

    from llmscale.model.gguf_loader import resolve_model

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("qwen2", **QWEN_05B_SHAPE)
    transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).save_pretrained(out)
    tokenizer = resolve_model(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    return out


def engine_of(model: Path, tp: int, dtype: str, backend: str) -> Any:
    from llmscale.config import EngineConfig
    from llmscale.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig.from_kwargs(model=str(model), dtype=dtype, tensor_parallel_size=tp,
                                              distributed_executor_backend=backend, kv_cache_memory="1GiB",
                                              max_model_len=2048, max_num_batched_tokens=512,
                                              enable_prefix_caching=False), online=True)


def measure(model: Path, tp: int, dtype: str, repeats: int, backend: str
            ) -> dict[str, tuple[float, float, float]]:
    from llmscale.model.layers import use_all_reduce

    engine = engine_of(model, tp, dtype, backend)
    reduce = delta = None
    if engine.workers is not None:
        reduce = Timer(engine.model.layers[0].mlp.down_proj.all_reduce)
        use_all_reduce(engine.model, reduce)
        delta = engine.workers.send = Timer(engine.workers.send)
    prompts = PromptSource(corpus_tokens(engine.tokenizer), random.Random(0))
    run_shape(engine, SHAPES["decode 1 x 256"], prompts, "warm-up")
    out = {}
    try:
        for name, shape in SHAPES.items():
            steps, reduces, deltas = [], [], []
            for r in range(repeats):
                before = (reduce.seconds if reduce else 0.0, delta.seconds if delta else 0.0)
                steps.append(run_shape(engine, shape, prompts, f"{name}-{r}"))
                reduces.append((reduce.seconds if reduce else 0.0) - before[0])
                deltas.append((delta.seconds if delta else 0.0) - before[1])
            out[name] = (statistics.median(steps), statistics.median(reduces), statistics.median(deltas))
    finally:
        engine.shutdown()
    return out


def planner_rows(model: str, hardware: str, sizes: list[int]) -> list[tuple[str, int, float]]:
    """(shape, TP, predicted step seconds) by the planner's model on a catalogue GPU: bf16
    weights, all-reduces over its NVLink."""
    from llmscale.plan.deployment import Deployment, ModelSpec
    from llmscale.plan.hardware import get_hardware, load_catalogue

    (gpu,) = get_hardware(load_catalogue(), hardware)
    spec = ModelSpec.load(model)
    models = {tp: Deployment(gpu, "bf16", tp).step_model(spec) for tp in sizes}
    return [(name, tp, models[tp].step_seconds(shape)) for name, shape in SHAPES.items() for tp in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="an HF folder (default: see above)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--backend", default="mp", choices=("mp", "ray"), help="where ranks 1..T-1 run")
    parser.add_argument("--no-planner", action="store_true", help="skip the planner's GPU figures")
    parser.add_argument("--gpu", default="h100-sxm", help="catalogue entry for the planner's predictions")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model = args.model or random_model(Path("results/tp-model"))
    results = {tp: measure(model, tp, args.dtype, args.repeats, args.backend) for tp in sizes}
    print(f"{cpu_model_name()}; {model}; dtype {args.dtype}; {args.backend} ranks; median of {args.repeats} "
          f"steps; ms")
    header = ("shape", "TP", "step", "all-reduce", "delta", "rest", "vs TP=1")
    print(f"{header[0]:18s} {header[1]:>3s} " + " ".join(f"{h:>10s}" for h in header[2:]))
    for name in SHAPES:
        base = results[sizes[0]][name][0]
        for tp in sizes:
            step, reduce, delta = results[tp][name]
            print(f"{name:18s} {tp:3d} {step * 1e3:10.1f} {reduce * 1e3:10.1f} {delta * 1e3:10.2f} "
                  f"{(step - reduce - delta) * 1e3:10.1f} {base / step:9.2f}x")
    for model in () if args.no_planner else ("llama-3.1-8b", "llama-3.1-70b"):
        rows = planner_rows(model, args.gpu, sizes)
        print(f"\nplanner's model, {model} bf16 on {args.gpu} (NVLink), ms")
        base = {name: seconds for name, tp, seconds in rows if tp == sizes[0]}
        for name, tp, seconds in rows:
            print(f"{name:18s} {tp:3d} {seconds * 1e3:10.2f} {base[name] / seconds:9.2f}x")


if __name__ == "__main__":
    main()
