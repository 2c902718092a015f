"""The `llmscale` command as a user runs it: streamed generation, chat, one-line errors, what
`serve` says while it runs, and tables that stay whole in a pipe."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from llmscale.kernels import cpu as cpu_kernels

from .live_server import free_port

# A pipe as a script or a log sees it: no terminal width or colour settings inherited from the
# shell that runs the tests.
PIPE_ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # stdin is a pipe too, never the terminal pytest may have: rich sizes tables by any tty it finds.
    return subprocess.run([sys.executable, "-m", "llmscale.cli", *args], input=stdin, text=True,
                          capture_output=True, timeout=600, env=PIPE_ENV)


def test_generate_and_chat(smollm_folder) -> None:
    common = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "512",
              "--max-tokens", "24"]
    out = run_cli("chat", *common, stdin="What is the capital of France?\n\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    out = run_cli("generate", "1, 2, 3, 4,", *common)
    assert out.returncode == 0, out.stderr
    assert "5" in out.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "hi", "--model", "/no/such/model"], "not found"),
    (["generate", "hi", "--batching", "fifo"], "invalid choice"),
    (["generate", "hi", "--kv-cache-memory", "lots"], "cannot read memory size 'lots'"),
    (["cluster", "serve", "--num-replicas", "0"], "--num-replicas must be >= 1"),
    (["cluster", "serve", "--router", "random"], "invalid choice: 'random'"),
    (["cluster", "status", "--url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
])
def test_bad_arguments_give_one_line_errors(args: list[str], message: str, smollm_folder) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_a_replica_that_cannot_start_is_a_one_line_error() -> None:
    from llmscale.config import EngineConfig
    from llmscale.engine.runner import kv_bytes_per_block
    from llmscale.model.loader import read_model_config
    from llmscale.model.lookup import resolve_model

    out = run_cli("cluster", "serve", "--port", str(free_port()), "--kv-cache-memory", "1MiB",
                  "--max-model-len", "512")
    assert out.returncode == 2
    # The cache's dtype, and so how many blocks 1 MiB holds, follows this CPU (bf16 with AVX-512
    # BF16, else fp32).
    per_block = kv_bytes_per_block(read_model_config(resolve_model(None)), 16,
                                   EngineConfig.from_kwargs(max_model_len=512).kv_dtype)
    blocks = (1 << 20) // per_block
    assert out.stderr.splitlines()[-1] == (
        f"llmscale: error: a replica could not start: KV cache holds {16 * blocks} tokens ({blocks} "
        f"block{'s' if blocks != 1 else ''} of 16), less than one request of max_model_len 512; "
        "raise --kv-cache-memory or lower --max-model-len")
    assert "Traceback" not in out.stderr


def header_cells(table_text: str, first: str) -> list[str]:
    """The header cells of the printed table whose first header cell is `first`."""
    header = next(line for line in table_text.splitlines() if re.match(rf"┃ {re.escape(first)} +┃", line))
    return [cell.strip() for cell in header.strip("┃ ").split("┃")]


class Serve:
    """`llmscale [FLAGS] serve [SERVE_FLAGS]` on a free port, its stderr read line by line."""

    def __init__(self, model: Path, *flags: str, serve_flags: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmscale.cli", *flags, "serve", *serve_flags, "--port", str(self.port),
             "--model", str(model), "--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "16MiB",
             "--max-model-len", "256"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**PIPE_ENV, "TOKENIZERS_PARALLELISM": "false"})
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read_until(self, pattern: str, timeout_s: float = 180) -> list[str]:
        """Lines up to and including the first that contains `pattern`."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while not seen or pattern not in seen[-1]:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                printed = "\n".join(seen)
                raise AssertionError(f"serve printed no {pattern!r} in {timeout_s} s:\n{printed}") from None
            assert line is not None, f"serve exited before printing {pattern!r}:\n" + "\n".join(seen)
            seen.append(line)
        return seen

    def wait_healthy(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, "serve exited during startup"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not become healthy"
            time.sleep(0.3)

    def stop(self) -> tuple[int, str, list[str]]:
        """SIGTERM; the exit status, stdout and the stderr lines not read yet."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stdout is not None
        stdout = self.proc.stdout.read()
        code = self.proc.wait(timeout=60)
        rest: list[str] = []
        while (line := self.lines.get(timeout=10)) is not None:
            rest.append(line)
        return code, stdout, rest


def test_serve_says_what_it_serves_and_where(tiny_model) -> None:
    model = tiny_model("llama")
    server = Serve(model)
    try:
        url = f"http://127.0.0.1:{server.port}/v1"
        lines = server.read_until(url)
        # What it answers at that URL is the model the line names.
        assert httpx.get(f"{url}/models").json()["data"][0]["id"] == str(model)
    finally:
        code, stdout, rest = server.stop()
    text = "\n".join(lines + rest)
    assert "\x1b" not in text  # no colour codes in a pipe
    assert f"llmscale serve: {model}, float32 on cpu, context 256 tokens, loaded in " in lines[-4]
    kernels = "llmscale C kernels (AVX2 FMA" if cpu_kernels.available() else "torch's ops"
    assert lines[-3].startswith(f"  kernels:  {kernels}")
    # 16 MiB of K and V for 2 layers x 2 KV heads x 16 dims in fp32: 8 KiB per 16-token block.
    assert lines[-2] == "  KV cache: 2048 blocks x 16 tokens = 32768 tokens, 16.0 MiB float32"
    assert lines[-1] == f'llmscale serve: ready at {url} as model "{model}" (Ctrl-C to stop)'
    assert code == 0 and stdout == ""
    assert rest[-2:] == ["llmscale serve: shutting down, finishing requests in flight (up to 30 s)",
                         "llmscale serve: stopped"]


def test_quiet_and_verbose_go_before_or_after_the_command() -> None:
    from llmscale.cli import build_parser

    parser = build_parser()
    for argv, verbose, quiet in [(["serve"], False, False), (["-q", "serve"], False, True),
                                 (["serve", "-q"], False, True), (["bench", "offline", "-v"], True, False)]:
        args = parser.parse_args(argv)
        assert (args.verbose, args.quiet) == (verbose, quiet), argv
    out = run_cli("-v", "serve", "-q")
    assert out.returncode == 2 and "exclude each other" in out.stderr


def test_quiet_serve_prints_nothing(tiny_model) -> None:
    server = Serve(tiny_model("llama"), serve_flags=("-q",))  # as `make serve ARGS=-q` runs it
    try:
        server.wait_healthy()
    finally:
        code, stdout, rest = server.stop()
    assert code == 0 and stdout == ""
    assert not any("llmscale serve" in line for line in rest), rest


def test_tables_stay_whole_in_a_pipe_and_quiet_keeps_them(tiny_model, tmp_path: Path) -> None:
    out = run_cli("-q", "eval", str(tiny_model("llama")), "--out", str(tmp_path), "--dtype", "float32",
                  "--kv-cache-memory", "16MiB", "--window", "32", "--max-windows", "2", "--num-prompts", "2",
                  "--prompt-len", "8", "--greedy-tokens", "6", "--tpot-tokens", "4", "--tpot-repeats", "1",
                  "--batch-size", "2", "--batch-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout and "\x1b" not in out.stdout
    assert header_cells(out.stdout, "model") == [
        "model", "dtype", "params (M)", "disk (MB)", "load (s)", "peak RSS (MB)", "perplexity",
        "top-1 agree", "TPOT (ms)", "batched tok/s"]
    assert "│ float32 │" in out.stdout
    assert not re.search(r"\d+/\d+ +\d+:\d\d:\d\d", out.stdout)  # -q: no progress bars


def test_engine_flags_come_from_one_dataclass_and_validate_before_loading() -> None:
    import argparse

    from llmscale.config import CacheConfig, EngineConfig, SchedulerConfig
    from llmscale.engine_args import PARALLEL, EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert f"(default: {SchedulerConfig().max_num_seqs})" in helps["max_num_seqs"]  # the config's own
    assert f"(default: {CacheConfig().block_size})" in helps["block_size"]
    unset = EngineArgs.from_cli_args(parser.parse_args([]))
    assert unset.kwargs() == {} and unset.create_engine_config() == EngineConfig.from_kwargs()
    args = parser.parse_args(["--max-num-seqs", "7", "-tp", "2", "--no-enable-prefix-caching"])
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert (config.scheduler.max_num_seqs, config.parallel.tensor_parallel_size) == (7, 2)
    assert config.cache.enable_prefix_caching is False
    assert EngineArgs.from_cli_args(args).kwargs((PARALLEL,)) == {"tensor_parallel_size": 2}
    only_parallel = argparse.ArgumentParser()
    EngineArgs.add_cli_args(only_parallel, (PARALLEL,))
    pp = EngineArgs.from_cli_args(only_parallel.parse_args(["-pp", "2"]))
    assert pp.kwargs() == {"pipeline_parallel_size": 2}
    # Bad values are refused in one line before any model loads (no --model is even resolved).
    out = subprocess.run([sys.executable, "-m", "llmscale.cli", "generate", "hi", "--model", "/no/such/model",
                          "--max-num-seqs", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "max_num_seqs" in out.stderr and out.stderr.count("\n") == 1
