"""The `llmscale` command as a user runs it: streamed generation, chat, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmscale.cli", *args], input=stdin, text=True,
                          capture_output=True, timeout=600)


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
])
def test_bad_arguments_give_one_line_errors(args: list[str], message: str, smollm_folder) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
