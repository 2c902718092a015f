"""The `llmscale` command: thin, it parses flags and calls the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from llmscale.config import (
    BATCHING_POLICIES,
    DTYPE_CHOICES,
    DTYPE_HELP,
    EXECUTOR_BACKENDS,
    ConfigError,
    EngineConfig,
)
from llmscale.console import set_quiet, status

# Commands that live with their layer: each module has `register(subparsers)`, which adds its
# parser(s) and sets `func`. Registration imports only what building the parser needs.
COMMAND_MODULES: tuple[str, ...] = ("llmscale.bench.profile", "llmscale.bench.cli",
                                     "llmscale.compress.evaluate", "llmscale.compress.prune",
                                     "llmscale.compress.distill", "llmscale.compress.quantize",
                                     "llmscale.cluster.cli", "llmscale.cluster.edge_cli",
                                     "llmscale.plan.cli")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF folder or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--keep-quantized", action="store_true",
                   help="serve a GGUF's Q8_0/Q4_0/Q4_1 weights with int8/int4 kernels instead of "
                        "dequantizing them")
    g.add_argument("--prepack-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="keep a copy of fp32 CPU weights packed for a faster GEMM (the C kernels' panels, "
                        "else oneDNN's layout) for faster batched linears "
                        "(default: when it takes at most 1/8 of free memory)")
    g.add_argument("--stream-weights", action="store_true",
                   help="start serving before every layer's weights are loaded: layers load in order "
                        "while the first request runs through them (CPU)")
    g.add_argument("--cpu-threads-bind", default=None, metavar="CORES",
                   help="pin the engine's threads to these cores, one each (0-1, 0,2,4); with several "
                        "ranks one list per rank, separated by | (0-7|8-15); default: no pinning")
    g.add_argument("--log-steps", default=None, metavar="FILE",
                   help="append one JSON line per engine step to FILE: when it ended, its seconds, and "
                        "each scheduled request's [cached tokens, new tokens, samples]")
    g.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run every step eagerly instead of replaying CUDA graphs for decodes")
    g.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    g.add_argument("--kv-cache-memory", default="0.1",
                   help="KV cache size: bytes (2GiB, 512MB) or a fraction of free memory")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step (default: 2048; `serve` on CPU: 512)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="max requests running at once")
    g.add_argument("--batching", default="continuous", choices=BATCHING_POLICIES, help="batching policy")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    add_parallel_args(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """How an engine spreads over ranks: every command that builds one takes these."""
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="T",
                   help="split every layer over T ranks, one process each, joined by torch.distributed "
                        "(gloo on CPU, NCCL on GPU); default 1")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="P",
                   help="split the layers into P stages of T ranks each, with up to P micro-batches in "
                        "flight; default 1")
    g.add_argument("--context-parallel-size", "-cp", type=int, default=1, metavar="C",
                   help="C ranks, each holding the whole model, share every long prefill chunk (ring "
                        "attention); decodes and short chunks run on every rank; default 1")
    g.add_argument("--context-parallel-min-tokens", type=int, default=None, metavar="N",
                   help="with C > 1, split prefill chunks of at least N tokens (default: 1024)")
    g.add_argument("--distributed-executor-backend", default="mp", choices=EXECUTOR_BACKENDS,
                   help="where ranks 1..T*P*C-1 run: mp, local processes; ray, Ray actors in a placement "
                        "group (the cluster at RAY_ADDRESS, or a local one started here)")


def parallel_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`add_parallel_args`' flags as `EngineConfig.from_kwargs` / `LLM` keyword arguments."""
    return {name: getattr(args, name) for name in (
        "tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size",
        "context_parallel_min_tokens", "distributed_executor_backend")}


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    kv = args.kv_cache_memory
    return EngineConfig.from_kwargs(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        keep_quantized=args.keep_quantized, prepack_weights=args.prepack_weights,
        stream_weights=args.stream_weights,
        cpu_threads_bind=args.cpu_threads_bind, enforce_eager=args.enforce_eager,
        log_steps=args.log_steps, **parallel_kwargs(args),
        kv_cache_memory=kv, block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        batching=args.batching, enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params_from_args(args: argparse.Namespace) -> Any:
    from llmscale.engine.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def stream_tokens(engine: Any, prompt: Any, params: Any) -> Iterator[str]:
    """Run one request on a sync engine, yielding text deltas as they are produced."""
    rid = f"cli-{engine.stats['steps']}-{len(engine.groups)}"
    engine.add_request(rid, prompt, params)
    sent = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                text = out.outputs[0].text
                yield text[sent:]
                sent = len(text)


def cmd_generate(args: argparse.Namespace) -> None:
    from llmscale.engine.llm_engine import LLMEngine
    engine = LLMEngine(engine_config_from_args(args), stream_text=True)
    try:
        for delta in stream_tokens(engine, args.prompt, sampling_params_from_args(args)):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        engine.shutdown()  # its worker ranks, if any


def cmd_chat(args: argparse.Namespace) -> None:
    from llmscale.engine.llm_engine import LLMEngine
    engine = LLMEngine(engine_config_from_args(args), stream_text=True)
    params = sampling_params_from_args(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    status("chat with the model; empty line or Ctrl-D to quit")
    try:
        while True:
            try:
                user = input("> ")
            except (EOFError, KeyboardInterrupt):
                break
            if not user.strip():
                break
            history.append({"role": "user", "content": user})
            _, ids = engine.tokenizer.encode_chat(history, add_generation_prompt=True)
            prompt = {"prompt_token_ids": ids}
            reply = ""
            for delta in stream_tokens(engine, prompt, params):
                reply += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": reply})
    finally:
        engine.shutdown()  # its worker ranks, if any


def cmd_serve(args: argparse.Namespace) -> None:
    from llmscale.serve.server import run_server
    run_server(args, engine_config_from_args(args))


class Parser(argparse.ArgumentParser):
    """Takes -v/-q itself and gives them to every command it holds, so they go before or after
    a command's name (`llmscale -q serve`, `llmscale serve -q`, `make serve ARGS=-q`)."""

    def __init__(self, *args: Any, talk_default: Any = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A command's parser leaves the top level's value alone unless the flag is given to it.
        talk = self.add_mutually_exclusive_group()
        talk.add_argument("-v", "--verbose", action="store_true", default=talk_default,
                          help="also log engine and server details (model loading, each HTTP request)")
        talk.add_argument("-q", "--quiet", action="store_true", default=talk_default,
                          help="print only results, warnings and errors: no startup lines, hints or "
                               "progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmscale", description="Serve LLMs fast, within a budget.", talk_default=False)
    sub = parser.add_subparsers(dest="command", required=True)  # its parsers are `Parser`s too

    p = sub.add_parser("generate", help="generate from one prompt, streaming to the terminal")
    p.add_argument("prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that keeps the conversation")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    from llmscale.serve.server import add_serve_args
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    add_serve_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    set_quiet(args.quiet)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except ConfigError as e:
        print(f"llmscale: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
