"""The `llmscale` command: thin, it parses flags and calls the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from llmscale.config import ConfigError
from llmscale.console import set_quiet, status
from llmscale.engine_args import EngineArgs

# Commands that live with their layer: each module has `register(subparsers)`, which adds its
# parser(s) and sets `func`. Registration imports only what building the parser needs.
COMMAND_MODULES: tuple[str, ...] = ("llmscale.bench.profile", "llmscale.bench.cli",
                                     "llmscale.compress.evaluate", "llmscale.compress.prune",
                                     "llmscale.compress.distill", "llmscale.compress.quantize",
                                     "llmscale.cluster.cli", "llmscale.cluster.edge_cli",
                                     "llmscale.plan.cli")


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
    engine = LLMEngine(EngineArgs.from_cli_args(args).create_engine_config(), stream_text=True)
    try:
        for delta in stream_tokens(engine, args.prompt, sampling_params_from_args(args)):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        engine.shutdown()  # its worker ranks, if any


def cmd_chat(args: argparse.Namespace) -> None:
    from llmscale.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineArgs.from_cli_args(args).create_engine_config(), stream_text=True)
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
    run_server(args, EngineArgs.from_cli_args(args).create_engine_config())


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
    EngineArgs.add_cli_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that keeps the conversation")
    p.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    from llmscale.serve.server import add_serve_args
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    add_serve_args(p)
    EngineArgs.add_cli_args(p)
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
