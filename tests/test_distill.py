"""Distillation: the student's KL to the teacher falls, the result serves, training resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmscale import LLM, SamplingParams
from llmscale.compress.distill import (
    CHECKPOINT,
    CURVE,
    HISTORY,
    distill,
    kd_loss,
    layer_influence,
    pick_layers,
)

FAST = dict(seq_len=16, batch_size=2, eval_windows=4)


def test_kd_loss_is_zero_only_for_matching_distributions() -> None:
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    assert float(kd_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits, logits + 5.0, 2.0)) == pytest.approx(0.0, abs=1e-5)  # shift-invariant
    assert float(kd_loss(torch.zeros_like(logits), logits, 2.0)) > 0.01


def test_distillation_lowers_kl_and_the_student_serves(tiny_model, tmp_path: Path,
                                                       prompts: list[str]) -> None:
    teacher = tiny_model("llama")  # 2 layers, hidden 64
    out = tmp_path / "student"
    report = distill(str(teacher), out, steps=24, student_config="layers=1,hidden=32,intermediate=64,heads=2,"
                     "kv_heads=1", lr=3e-3, **FAST)
    assert report.init.startswith("random init")
    assert report.student_params < report.teacher_params
    assert report.kl_after < 0.9 * report.kl_before, (report.kl_before, report.kl_after)

    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (1, 32, 16)
    assert cfg["distillation"]["heldout_kl_after"] == pytest.approx(report.kl_after, abs=1e-4)
    llm = LLM(model=str(out), dtype="float32", kv_cache_memory="16MiB", max_model_len=256)
    outs = llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]


def test_copy_init_hidden_loss_and_resume(tiny_model, tmp_path: Path) -> None:
    teacher = tiny_model("llama")
    out = tmp_path / "student"
    args = dict(student_config="layers=1,intermediate=96", hidden_loss_weight=0.5, lr=1e-3,
                checkpoint_every=3, **FAST)
    first = distill(str(teacher), out, steps=3, **args)
    assert first.init.startswith("teacher layers [")
    assert torch.load(out / CHECKPOINT, weights_only=False)["step"] == 3
    assert json.loads((out / HISTORY).read_text())["step"] == [1, 2, 3]

    resumed = distill(str(teacher), out, steps=7, resume=True, **args)
    assert resumed.init == "resumed at step 3"
    assert resumed.kl_before == pytest.approx(first.kl_after, rel=1e-4)  # the same weights came back
    assert torch.load(out / CHECKPOINT, weights_only=False)["step"] == 7
    assert resumed.kl_after < resumed.kl_before
    history = json.loads((out / HISTORY).read_text())  # the resumed run carries the first run's history on
    assert history["step"] == list(range(1, 8)) and len(history["loss"]) == 7
    assert history["eval_step"] == [0, 3, 6, 7]
    assert history["heldout_kl"][-1] == pytest.approx(resumed.kl_after)
    assert (out / CURVE).stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 96
    # A checkpoint written before loss histories existed resumes, its history starting there.
    state = torch.load(out / CHECKPOINT, weights_only=False)
    del state["history"]
    torch.save(state, out / CHECKPOINT)
    distill(str(teacher), out, steps=9, resume=True, **args)
    history = json.loads((out / HISTORY).read_text())
    assert history["step"] == [8, 9] and history["eval_step"][0] == 7


@pytest.mark.parametrize("identity_layer", [0, 1])
def test_the_student_keeps_the_layers_that_change_the_hidden_state(tiny_model, identity_layer: int) -> None:
    """A layer whose output projections are zero passes its input through unchanged: its block
    influence is zero and a one-layer student keeps the other one."""
    from llmscale.compress.checkpoint import load_model

    teacher, _ = load_model(str(tiny_model("llama")))
    layer = teacher.layers[identity_layer]
    layer.self_attn.o_proj.weight.data.zero_()
    layer.mlp.down_proj.weight.data.zero_()
    batch = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    influence = layer_influence(teacher, batch)
    assert influence[identity_layer] == pytest.approx(0.0, abs=1e-5)
    assert influence[1 - identity_layer] > 0.01
    assert pick_layers(influence, 1) == [1 - identity_layer]
    assert pick_layers([0.9, 0.1, 0.5, 0.7], 3) == [0, 2, 3]  # kept in the teacher's order


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cross_entropy_on_the_text_lowers_it_in_either_precision(tiny_model, tmp_path: Path,
                                                                 precision: str) -> None:
    teacher = tiny_model("llama")
    report = distill(str(teacher), tmp_path / "s", steps=12, student_config="layers=1", ce_weight=1.0,
                     precision=precision, lr=3e-3, checkpoint_every=6, **FAST)
    assert report.mixed_precision == (precision == "bf16")
    losses = json.loads((tmp_path / "s" / HISTORY).read_text())["loss"]
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())["distillation"]
    assert (cfg["ce_weight"], cfg["mixed_precision"]) == (1.0, precision == "bf16")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "5"], "give exactly one of --student MODEL or --student-config"),
    (["--steps", "5", "--student-config", "depth=3"], "bad --student-config item 'depth=3'"),
    (["--steps", "5", "--student-config", "layers=two"], "layers must be an integer, got 'two'"),
    (["--steps", "0", "--student-config", "layers=1"], "--steps must be >= 1, got 0"),
    (["--steps", "5", "--student-config", "layers=1", "--resume"], "nothing to resume"),
    (["--steps", "5", "--student-config", "layers=1", "--ce-weight", "-1"], "--ce-weight >= 0"),
])
def test_bad_arguments_give_one_line_errors(tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    from llmscale.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(tiny_model("llama")), "--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmscale: error: ") and message in err
