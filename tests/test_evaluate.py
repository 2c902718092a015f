"""`llmscale eval`: the table's fields from real worker processes, and perplexity by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

from llmscale.cli import main
from llmscale.compress.eval_worker import count_parameters, perplexity, perplexity_windows
from llmscale.compress.evaluate import print_table
from llmscale.model.loader import read_model_config
from tests.hf_reference import hf_all_logits, hf_model

SMALL = ["--dtype", "float32", "--kv-cache-memory", "16MiB", "--window", "32", "--max-windows", "2",
         "--num-prompts", "2", "--prompt-len", "8", "--greedy-tokens", "6", "--tpot-tokens", "4",
         "--tpot-repeats", "1", "--batch-size", "2", "--batch-tokens", "4"]


def test_eval_table(tiny_model, tmp_path) -> None:
    llama, qwen2 = tiny_model("llama"), tiny_model("qwen2")
    out = tmp_path / "eval"
    main(["eval", str(llama), str(qwen2), "--reference", str(qwen2), "--out", str(out), *SMALL])
    report = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 10_000
    rows = report["models"]
    assert [r["model"] for r in rows] == [str(llama), str(qwen2)]
    assert [r["is_reference"] for r in rows] == [False, True]
    for folder, r in zip((llama, qwen2), rows, strict=True):
        assert r["parameters"] == hf_model(folder).num_parameters()
        assert r["disk_bytes"] == (folder / "model.safetensors").stat().st_size
        assert r["load_s"] > 0 and r["tpot_s"] > 0 and r["throughput_tok_s"] > 0
        assert r["peak_rss_bytes"] > 50 * 2**20  # torch alone is more than this
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["perplexity_tokens"] == 2 * 31
        assert r["agreement_tokens"] == 2 * 6 and 0 <= r["agreement"] <= 1
    # A model agrees with its own greedy tokens under teacher forcing.
    assert rows[1]["agreement"] == 1.0
    assert len(report["reference_tokens"]["greedy"]) == 2
    console = Console(width=250, record=True)
    print_table(report, console)
    table = console.export_text()
    assert "top-1 agree" in table and "100.0%" in table and "tiny-qwen20 *" in table


@pytest.mark.parametrize("split", [["--pipeline-parallel-size", "2"], ["--context-parallel-size", "2",
                                                                       "--context-parallel-min-tokens", "8"]],
                         ids=["pipeline", "context"])
def test_eval_of_a_parallel_engine_scores_as_one_rank(split: list[str], tiny_model, tmp_path) -> None:
    llama = tiny_model("llama")
    rows = []
    for name, flags in (("one", []), ("split", split)):
        main(["eval", str(llama), "--out", str(tmp_path / name), *SMALL, *flags])
        rows.append(json.loads((tmp_path / name / "eval.json").read_text())["models"][0])
    assert rows[1]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=1e-4)
    assert rows[1]["agreement"] == rows[0]["agreement"]


def test_perplexity_matches_transformers(tiny_model) -> None:
    from llmscale.engine.llm import LLM

    folder = tiny_model("llama")
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory="16MiB", max_model_len=128)
    windows = perplexity_windows(llm.tokenizer, 48, 3)
    assert len(windows) == 3 and all(len(w) == 48 for w in windows)
    got, count = perplexity(llm, windows)
    nll = []
    for w in windows:
        logprobs = torch.log_softmax(hf_all_logits(folder, w), dim=-1)
        nll += [-float(logprobs[i - 1, w[i]]) for i in range(1, len(w))]
    assert count == len(nll) == 3 * 47
    assert got == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_parameter_count_matches_transformers(tiny_model) -> None:
    for kind in ("llama", "llama3-rope", "qwen2", "mistral"):
        folder = tiny_model(kind)
        assert count_parameters(read_model_config(folder)) == hf_model(folder).num_parameters()


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "/no/such/model"], "model '/no/such/model' not found"),
    (["eval", "--window", "1"], "--window must be >= 2"),
    (["eval", "--tpot-tokens", "1"], "--tpot-tokens must be >= 2"),
])
def test_bad_arguments_give_one_line_errors(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
