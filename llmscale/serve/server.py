"""`llmscale serve`: build the engine, put the app in front of it, run uvicorn until a signal."""

from __future__ import annotations

import argparse
import signal

from llmscale.config import ConfigError, EngineConfig
from llmscale.console import status


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every path but /health and /metrics")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="requests allowed to wait for their first token; beyond it: 429")
    g.add_argument("--max-n", type=_positive_int, default=128,
                   help="most choices (`n`) one request may ask for; beyond it: 400")
    # 8 MiB holds a 128k-token prompt at 64 bytes a token: ~4 characters, each up to a 12-byte
    # JSON escape (a surrogate pair), or a token id list at under 10 bytes an id.
    g.add_argument("--max-body-bytes", type=_positive_int, default=8 << 20,
                   help="largest request body in bytes (default: 8 MiB); beyond it: 413")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish after SIGTERM/SIGINT")
    g.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's)")
    g.add_argument("--price-input-per-1m", type=float, default=0.0, help="USD per 1M prompt tokens")
    g.add_argument("--price-output-per-1m", type=float, default=0.0, help="USD per 1M generated tokens")
    g.add_argument("--hardware-cost-per-hour", type=float, default=None,
                   help="USD per hour of this server; token prices then follow measured throughput")


def run_server(args: argparse.Namespace, config: EngineConfig) -> None:
    # The engine and the web stack load only to serve, not to build the CLI parser.
    import uvicorn

    from llmscale.engine.async_engine import AsyncLLMEngine
    from llmscale.serve.app import create_app
    from llmscale.serve.banner import AnnouncingServer, announce_engine
    from llmscale.serve.cost import CostModel

    if args.max_queue < 0 or args.drain_timeout < 0:
        raise ConfigError("--max-queue and --drain-timeout must be >= 0")
    cost = CostModel(args.price_input_per_1m, args.price_output_per_1m, args.hardware_cost_per_hour)
    died: list[BaseException] = []

    def stop_on_death(error: BaseException) -> None:  # the engine cannot serve again: stop
        died.append(error)
        server.should_exit = True

    engine = AsyncLLMEngine.from_config(config, stop_on_death)
    announce_engine(engine.engine)
    app = create_app(engine, args.served_model_name, args.api_key, args.max_queue, cost,
                     max_n=args.max_n, max_body_bytes=args.max_body_bytes)
    # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler lets
    # that end as a clean exit (status 0) instead of a death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = AnnouncingServer(uvicorn.Config(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=args.drain_timeout,
        log_level="info" if args.verbose else "warning"), app.state.server.model_name)
    try:
        server.run()
    finally:
        engine.shutdown()
    if died:
        raise ConfigError(f"the engine stopped: {died[0]}")
    status("llmscale serve: stopped")
