"""Pruning: exact sparsity, the 2:4 pattern, structured shapes that serve, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmscale import LLM, SamplingParams
from llmscale.compress.checkpoint import load_model
from llmscale.compress.dense_forward import causal_logits
from llmscale.compress.prune import is_linear_weight, prune
from tests.hf_reference import hf_model


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_dense_forward_matches_transformers(tiny_model, kind: str) -> None:
    folder = tiny_model(kind)
    model, _ = load_model(str(folder))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = causal_logits(model, ids)
        theirs = hf_model(folder)(ids).logits.float()
    assert ours.shape == (2, 24, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def test_magnitude_hits_exact_sparsity(tiny_model, tmp_path: Path) -> None:
    folder = tiny_model("llama")
    report = prune(str(folder), "magnitude", 0.3, tmp_path / "out", time_forward=False)
    before, after = _weights(folder), _weights(tmp_path / "out")
    assert before.keys() == after.keys()
    for name, w in after.items():
        if is_linear_weight(name):
            assert int((w == 0).sum()) == round(0.3 * w.numel()), name
            kept = w != 0
            assert torch.equal(w[kept], before[name][kept])  # survivors unchanged
            assert before[name][~kept].abs().max() <= before[name][kept].abs().min()
        else:  # embeddings, lm_head and norms are never pruned
            assert torch.equal(w, before[name]), name
    assert report.linear_sparsity == pytest.approx(0.3, abs=1e-4)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pruning"]["method"] == "magnitude"


def test_2_4_pattern(tiny_model, tmp_path: Path) -> None:
    folder = tiny_model("llama")
    prune(str(folder), "2:4", 0.5, tmp_path / "out", time_forward=False)
    before = _weights(folder)
    for name, w in _weights(tmp_path / "out").items():
        if not is_linear_weight(name):
            continue
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) == 2).all(), name
        # the two kept weights of each group are its two largest
        orig = before[name].reshape(groups.shape).abs()
        inf = torch.tensor(float("inf"))
        assert (orig.where(groups != 0, inf).amin(-1) >= orig.where(groups == 0, -inf).amax(-1)).all()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_structured_shrinks_and_serves(tiny_model, tmp_path: Path, prompts: list[str], kind: str) -> None:
    folder = tiny_model(kind)  # hidden 64, 4 query heads in 2 KV groups, MLP 128
    out = tmp_path / "out"
    report = prune(str(folder), "structured", 0.5, out, calibration_samples=2, seq_len=32,
                   time_forward=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["hidden_size"]) == (64, 2, 1, 16, 64)
    w = _weights(out)
    assert w["model.layers.1.mlp.gate_proj.weight"].shape == (64, 64)
    assert w["model.layers.1.mlp.down_proj.weight"].shape == (64, 64)
    assert w["model.layers.1.self_attn.q_proj.weight"].shape == (32, 64)
    assert w["model.layers.1.self_attn.k_proj.weight"].shape == (16, 64)
    assert w["model.layers.1.self_attn.o_proj.weight"].shape == (64, 32)
    if kind == "qwen2":
        assert w["model.layers.0.self_attn.q_proj.bias"].shape == (32,)
    assert report.params_after < report.params_before
    assert (out / "model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size

    # transformers reads the standard config the same way our model does
    model, _ = load_model(str(out))
    ids = torch.tensor([[1, 450, 7042, 282, 4649, 314]])
    with torch.inference_mode():
        torch.testing.assert_close(causal_logits(model, ids), hf_model(out)(ids).logits.float(),
                                   atol=2e-4, rtol=1e-4)

    llm = LLM(model=str(out), dtype="float32", kv_cache_memory="16MiB", max_model_len=256)
    outs = llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]


@pytest.mark.parametrize("argv, message", [
    (["--method", "random"], "unknown pruning method 'random'"),
    (["--method", "magnitude", "--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--method", "magnitude", "--sparsity", "-0.1"], "sparsity must be in [0, 1), got -0.1"),
    (["--method", "2:4", "--sparsity", "0.3"], "sparsity must be 0.5, got 0.3"),
])
def test_bad_arguments_give_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    from llmscale.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tmp_path / "no-model-needed"), *argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmscale: error: ") and message in err
    assert not (tmp_path / "out").exists()
