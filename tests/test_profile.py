"""`llmscale profile`: the FLOP/byte model against hand counts, the roofline label, one real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmscale.bench.roofline import Chunk, CostModel, Peaks, attainable, classify, measure_peaks
from llmscale.cli import main
from llmscale.config import ModelConfig, activation_dtype, parse_dtype

from .test_cli import header_cells, run_cli


def small_profile(model: Path, dtype: str, out: Path) -> list[str]:
    """`llmscale profile` arguments for a run of a few seconds on a tiny model."""
    return ["profile", "--model", str(model), "--dtype", dtype, "--out", str(out), "--num-requests", "3",
            "--prompt-len", "24", "--output-len", "4", "--batch-sizes", "1,2", "--context-lens", "16,40",
            "--steps", "2", "--matmul-size", "256", "--max-num-batched-tokens", "32"]


@pytest.fixture()
def cost() -> CostModel:
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256)
    return CostModel.from_config(cfg, weight_elem_bytes=4, kv_elem_bytes=4)


def test_weights_and_kv_sizes(cost: CostModel) -> None:
    # Per layer: qkv 64 x (64 + 32 + 32) = 8192, o 64 x 64 = 4096, gate+up+down 3 x 64 x 128 = 24576.
    assert cost.linear_params == 2 * 36864
    # Plus 2 norms of 64 per layer and the final norm: (73728 + 320) fp32 weights.
    assert cost.body_weight_bytes == 296192
    assert cost.lm_head_bytes == 100 * 64 * 4
    # K and V x 2 layers x 2 KV heads x 16 dims x 4 bytes.
    assert cost.kv_bytes_per_token == 512


def test_decode_step(cost: CostModel) -> None:
    step = [Chunk(context=10, new=1, samples=True), Chunk(context=20, new=1, samples=True)]
    # linears 2 x 73728 x 2 tokens + LM head 2 x 100 x 64 x 2 rows + attention 4 x 2 layers x 4 heads
    # x 16 dims x (11 + 21) query-key pairs.
    assert cost.flops(step) == 294912 + 25600 + 16384
    # all weights + KV read of 11 + 21 tokens + KV write of 2 tokens.
    assert cost.bytes(step) == 296192 + 25600 + 32 * 512 + 2 * 512


def test_prefill_chunks(cost: CostModel) -> None:
    # 8 fresh tokens, causal: 1 + 2 + ... + 8 = 36 pairs.
    assert cost.flops([Chunk(0, 8, True)]) == 2 * 73728 * 8 + 2 * 100 * 64 + 4 * 2 * 4 * 16 * 36
    assert cost.bytes([Chunk(0, 8, True)]) == 296192 + 25600 + 8 * 512 + 8 * 512
    # A middle chunk after 8 cached tokens samples nothing: no LM head; pairs 8 x 8 + 36.
    assert cost.flops([Chunk(8, 8, False)]) == 2 * 73728 * 8 + 4 * 2 * 4 * 16 * 100
    assert cost.bytes([Chunk(8, 8, False)]) == 296192 + 16 * 512 + 8 * 512
    assert cost.flops([]) == 0 and cost.bytes([]) == 0


def test_quantized_weight_bytes_override() -> None:
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256, attention_bias=True)
    dense = CostModel.from_config(cfg, 2, 2)
    # q/k/v biases: 2 layers x (64 + 32 + 32), in bf16.
    assert dense.body_weight_bytes == (73728 + 320 + 256) * 2
    small = CostModel.from_config(cfg, 2, 2, body_weight_bytes=1000, lm_head_bytes=10)
    assert small.bytes([Chunk(0, 1, True)]) == 1000 + 10 + 2 * dense.kv_bytes_per_token
    assert small.flops([Chunk(0, 1, True)]) == dense.flops([Chunk(0, 1, True)])


def test_roofline_label() -> None:
    peaks = Peaks(matmul_flops=100e9, copy_bytes=20e9, read_bytes=25e9, dtype="float32", matmul_size=1,
                  buffer_bytes=1)
    assert peaks.memory_bytes == 25e9
    assert peaks.ridge == pytest.approx(4.0)
    assert classify(1.0, peaks.ridge) == "memory"
    assert classify(4.0, peaks.ridge) == "compute"
    assert classify(50.0, peaks.ridge) == "compute"
    assert attainable(1.0, peaks) == pytest.approx(25e9)
    assert attainable(50.0, peaks) == pytest.approx(100e9)


def test_measured_peaks_are_plausible() -> None:
    peaks = measure_peaks(torch.float32, torch.device("cpu"), matmul_size=256, buffer_bytes=16 * 2**20,
                          repeats=2)
    assert 1e8 < peaks.matmul_flops < 1e14
    assert 1e8 < peaks.copy_bytes < 1e13 and 1e8 < peaks.read_bytes < 1e13


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_profile_end_to_end(tiny_model, tmp_path, dtype: str) -> None:
    out = tmp_path / "profile"
    main(small_profile(tiny_model("llama"), dtype, out))
    report = json.loads((out / "profile.json").read_text())
    for png in ("roofline.png", "step_latency.png"):
        assert (out / png).stat().st_size > 10_000
    peaks = report["peaks"]
    assert peaks["matmul_flops"] > 0 and peaks["memory_bytes"] > 0 and peaks["ridge"] > 0
    # The GEMM peak is measured in the dtype the model computes in (fp32 for bf16 weights on a
    # CPU without bf16 arithmetic).
    computes_in = activation_dtype(parse_dtype(dtype), torch.device("cpu"))
    assert peaks["dtype"] == str(computes_in).removeprefix("torch.")

    phases = report["workload"]["phases"]
    # A 32-token budget: the first step prefills 24 + 8 tokens, later ones mix decodes with prefill.
    assert {"prefill", "decode", "mixed"} <= set(phases)
    # Every prompt token is computed once, and every output token but the last is fed back.
    assert sum(p["tokens"] for p in phases.values()) == 3 * (24 + 4 - 1)
    assert sum(p["time_share"] for p in phases.values()) == pytest.approx(1.0)

    points = [*phases.values(), *report["decode_sweep"], *report["prefill_sweep"]]
    assert len(report["decode_sweep"]) == 4 and len(report["prefill_sweep"]) == 2
    for p in points:
        assert p["seconds"] > 0 and p["flops_per_s"] > 0 and p["bytes_per_s"] > 0 and p["intensity"] > 0
        assert p["bound"] == classify(p["intensity"], peaks["ridge"])
    for p in report["decode_sweep"]:
        assert p["steps"] == 2 and p["tokens"] == 2 * p["batch_size"]
    for p in report["prefill_sweep"]:
        # 40 tokens exceed the 32-token budget: two chunks.
        assert p["tokens"] == p["context_len"] and p["steps"] == (2 if p["context_len"] == 40 else 1)


@pytest.mark.parametrize("split", [["--tensor-parallel-size", "2"], ["--pipeline-parallel-size", "2"]],
                         ids=["tensor", "pipeline"])
def test_profile_of_a_parallel_engine_counts_the_whole_model(split: list[str], tiny_model, tmp_path) -> None:
    """Rank 0 holds a part of the weights; the roofline counts the whole model's, as one rank's
    profile does (the vocabulary shards round up to whole rows, the norms are replicated)."""
    reports = []
    for name, flags in (("one", []), ("split", split)):
        main([*small_profile(tiny_model("llama"), "float32", tmp_path / name), *flags])
        reports.append(json.loads((tmp_path / name / "profile.json").read_text()))
    one, parallel = (r["workload"]["phases"] for r in reports)
    assert sum(p["tokens"] for p in parallel.values()) == sum(p["tokens"] for p in one.values())
    for part in ("body_weight_bytes", "lm_head_bytes"):
        assert reports[1]["cost_model"][part] == pytest.approx(reports[0]["cost_model"][part], rel=0.02)


def test_tables_stay_whole_in_a_pipe(tiny_model, tmp_path) -> None:
    out = run_cli(*small_profile(tiny_model("llama"), "float32", tmp_path))
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout and "\x1b" not in out.stdout
    assert header_cells(out.stdout, "phase") == [
        "phase", "steps", "tokens", "time (s)", "share", "ms/step", "GFLOP/s", "GB/s", "FLOP/B",
        "% peak FLOP/s", "% peak B/s", "bound"]
    for phase in ("prefill", "decode", "mixed"):
        assert f"│ {phase} " in out.stdout
    # However long its paths, a line of text stays one line.
    wrote = ", ".join(str(tmp_path / name) for name in ("profile.json", "roofline.png", "step_latency.png"))
    assert f"\nwrote {wrote}\n" in out.stdout


def test_bad_arguments_give_one_line_errors(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["profile", "--batch-sizes", "1,x"])
    assert e.value.code == 2
    assert "--batch-sizes must be comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["profile", "--calibrate", "--pipeline-parallel-size", "2"])
    assert e.value.code == 2
    assert "--calibrate fits the model of one engine process" in capsys.readouterr().err
