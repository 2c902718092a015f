"""Tensor, pipeline and context parallelism against one process on this machine's cores: decode
rounds and prefills, split into compute and communication.

    python benchmarks/parallel.py [--model DIR] [--dtype auto] [--repeats 3]
                                  [--layouts 1,TP=2,PP=2,CP=2] [--backend mp|ray] [--no-planner]

The default model's 9 attention heads do not split over 2 ranks, so by default the model is
Qwen2.5-0.5B's shape (hidden 896, 14 query and 2 KV heads, MLP 4864, 24 layers) with SmolLM2's
vocabulary and tokenizer and random weights, written once to results/tp-model (the same FLOPs
and bytes per token as the real one, whose weights cannot be fetched here). Every layout gets
the same cores in total: one process with every core, or two ranks with half each.

- decode R x 256: R requests placed in the running batch with 256 tokens of context (as
  `llmscale profile` places them), run until each has 16 more tokens; printed per round (every
  request one token further). With two pipeline stages the requests ride in two micro-batches.
- prefill N: one prompt of N tokens, to its first token, in one step (budget 4096). Context
  parallelism splits every chunk here (`--context-parallel-min-tokens 1`), to find where it pays.

Communication is rank 0's time in it, waiting for the other rank included: all-reduces (TP),
waiting for stage 1 to return the logits (PP: stage 1's compute as well, since rank 0 has
nothing else to do then), the ring exchanges and the hidden-state gather (CP); and handing the
workers each step's delta, in every layout.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmscale.bench.profile import PromptSource, corpus_tokens, place_running
from llmscale.bench.roofline import Chunk
from llmscale.config import cpu_model_name

DECODES = {f"decode {r} x 256": r for r in (1, 8, 32)}
PREFILLS = {f"prefill {n}": n for n in (256, 1024, 2048, 4096)}
DECODE_TOKENS = 16
LAYOUTS = {"1": {}, "TP=2": {"tensor_parallel_size": 2}, "PP=2": {"pipeline_parallel_size": 2},
           "CP=2": {"context_parallel_size": 2, "context_parallel_min_tokens": 1}}


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
                      max_position_embeddings=8192, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def random_model(out: Path) -> Path:
    """Qwen2.5-0.5B's shape with random weights and SmolLM2's tokenizer (see the docstring)."""
    if (out / "config.json").is_file():
        return out
    import shutil

    import torch
    import transformers

    from llmscale.model.lookup import resolve_model

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("qwen2", **QWEN_05B_SHAPE)
    transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).save_pretrained(out)
    tokenizer = resolve_model(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    return out


def engine_of(model: Path, layout: dict[str, int], dtype: str, backend: str) -> Any:
    from llmscale.config import EngineConfig
    from llmscale.engine.llm_engine import LLMEngine

    config = EngineConfig.from_kwargs(model=str(model), dtype=dtype, distributed_executor_backend=backend,
                                      kv_cache_memory="1GiB", max_model_len=4352, max_num_batched_tokens=4096,
                                      enable_prefix_caching=False, **layout)
    return LLMEngine(config, online=True)


def communication_timers(engine: Any) -> list[Timer]:
    """Timers around everything rank 0 spends communicating in this engine's layout."""
    from llmscale.model.layers import use_all_reduce

    if engine.workers is None:
        return []
    timers = [Timer(engine.workers.send)]
    engine.workers.send = timers[0]
    parallel = engine.config.parallel
    if parallel.tensor_parallel_size > 1:
        timers.append(Timer(engine.model.layers[0].mlp.down_proj.all_reduce))
        use_all_reduce(engine.model, timers[-1])
    if engine.pipeline is not None:
        link = engine.pipeline.link
        link.recv_logits = Timer(link.recv_logits)
        link.flush = Timer(link.flush)
        timers += [link.recv_logits, link.flush]
    context = engine.runner.context
    if context is not None:
        context.wait, context.gather_hidden = Timer(context.wait), Timer(context.gather_hidden)
        timers += [context.wait, context.gather_hidden]
    return timers


def decode_round(engine: Any, prompts: PromptSource, batch: int, tag: str) -> float:
    """Seconds of DECODE_TOKENS rounds of `batch` requests at 256 tokens of context (each round
    every request a token further)."""
    from llmscale.engine.request import Request
    from llmscale.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        req = Request(f"{tag}-{i}", prompts.take(256), params, DECODE_TOKENS, engine.eos_token_ids)
        place_running(engine, req, 255, "the decode batch")  # the last prompt token is the first input
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def prefill(engine: Any, prompts: PromptSource, n: int, tag: str) -> float:
    from llmscale.engine.sampling_params import SamplingParams

    engine.add_request(tag, {"prompt_token_ids": prompts.take(n)}, SamplingParams(max_tokens=1))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def measure(model: Path, layout: dict[str, int], dtype: str, repeats: int, backend: str
            ) -> dict[str, tuple[float, float]]:
    """Per shape: (median seconds, median seconds of rank 0 communicating)."""
    engine = engine_of(model, layout, dtype, backend)
    timers = communication_timers(engine)
    prompts = PromptSource(corpus_tokens(engine.tokenizer), random.Random(0))
    decode_round(engine, prompts, 8, "warm-up")
    prefill(engine, prompts, 256, "warm-up-prefill")
    # Per shape: what it runs, and how many of the printed unit (a decode round) that is.
    shapes: dict[str, tuple[Callable[[str], float], int]] = {
        **{name: ((lambda tag, r=r: decode_round(engine, prompts, r, tag)), DECODE_TOKENS)
           for name, r in DECODES.items()},
        **{name: ((lambda tag, n=n: prefill(engine, prompts, n, tag)), 1) for name, n in PREFILLS.items()}}
    out = {}
    try:
        for name, (run, units) in shapes.items():
            times, comms = [], []
            for r in range(repeats):
                before = sum(t.seconds for t in timers)
                times.append(run(f"{name}-{r}") / units)
                comms.append((sum(t.seconds for t in timers) - before) / units)
            out[name] = (statistics.median(times), statistics.median(comms))
    finally:
        engine.shutdown()
    return out


def planner_rows(model: str, hardware: str) -> list[tuple[str, str, float]]:
    """(shape, layout, predicted seconds) by the planner's model on a catalogue GPU, bf16 weights:
    TP's all-reduces over NVLink; a pipeline's round is P micro-batches of 1/P of the requests,
    each through every stage, overlapped (the round takes one micro-batch's time through all
    stages); a prefill is one micro-batch, so its stages take turns; CP from the same model's
    sums (below)."""
    from llmscale.plan.deployment import Deployment, ModelSpec
    from llmscale.plan.hardware import get_hardware, load_catalogue
    from llmscale.plan.step_model import SEND_LATENCY_S

    (gpu,) = get_hardware(load_catalogue(), hardware)
    spec = ModelSpec.load(model)
    one, tp2, pp2 = (Deployment(gpu, "bf16", tp, pp).step_model(spec) for tp, pp in ((1, 1), (2, 1), (1, 2)))
    kv_bytes, layers = one.geometry.kv_bytes_per_token, spec.config.num_hidden_layers
    bandwidth = one.coefficients.interconnect_bandwidth
    rows = []
    for name, r in DECODES.items():
        shape = [Chunk(256, 1, True)] * r
        # Each micro-batch's time through both stages is two stage turns: a round's length.
        rows += [(name, "1", one.step_seconds(shape)), (name, "TP=2", tp2.step_seconds(shape)),
                 (name, "PP=2", pp2.step_seconds(shape[:max(1, r // 2)]))]
    for name, n in PREFILLS.items():
        shape = [Chunk(0, n, True)]
        rows += [(name, layout, m.step_seconds(shape))
                 for layout, m in (("1", one), ("TP=2", tp2), ("PP=2", pp2))]
        # CP=2 (the planner does not model it; its step model does the sums): each GPU runs half
        # the tokens and half the causal pairs (Chunk(n/4, n/2) has n^2/4 + n/4 of them), then
        # sends its K/V part to the other in every layer, here not overlapped with compute.
        ring = n // 2 * kv_bytes / bandwidth + layers * SEND_LATENCY_S
        rows.append((name, "CP=2", one.step_seconds([Chunk(n // 4, n // 2, True)]) + ring))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="an HF folder (default: see above)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {', '.join(LAYOUTS)}")
    parser.add_argument("--backend", default="mp", choices=("mp", "ray"), help="where ranks 1.. run")
    parser.add_argument("--no-planner", action="store_true", help="skip the planner's GPU figures")
    parser.add_argument("--gpu", default="h100-sxm", help="catalogue entry for the planner's predictions")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    model = args.model or random_model(Path("results/tp-model"))
    results = {name: measure(model, LAYOUTS[name], args.dtype, args.repeats, args.backend)
               for name in layouts}
    print(f"{cpu_model_name()}; {model}; dtype {args.dtype}; {args.backend} ranks; "
          f"median of {args.repeats}; ms")
    print(f"{'shape':18s} {'layout':>6s} {'total':>10s} {'comm':>10s} {'compute':>10s} {'vs 1':>8s}")
    for name in (*DECODES, *PREFILLS):
        base = results[layouts[0]][name][0]
        for layout in layouts:
            total, comm = results[layout][name]
            print(f"{name:18s} {layout:>6s} {total * 1e3:10.1f} {comm * 1e3:10.1f} "
                  f"{(total - comm) * 1e3:10.1f} {base / total:7.2f}x")
    for model_name in () if args.no_planner else ("llama-3.1-8b", "llama-3.1-70b"):
        rows = planner_rows(model_name, args.gpu)
        print(f"\nplanner's model, {model_name} bf16 on {args.gpu} (NVLink), ms")
        base = {name: seconds for name, layout, seconds in rows if layout == "1"}
        for name, layout, seconds in rows:
            print(f"{name:18s} {layout:>6s} {seconds * 1e3:10.2f} {base[name] / seconds:7.2f}x")


if __name__ == "__main__":
    main()
