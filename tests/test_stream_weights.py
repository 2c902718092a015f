"""--stream-weights: the engine serves while its decoder layers load in order, and a request that
runs through them gets the tokens the fully loaded engine gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llmscale import LLM, SamplingParams
from llmscale.compress.quantize import quantize_model
from llmscale.config import ConfigError
from llmscale.model.loader import load_model

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _tokens(llm: LLM, prompts: list[str]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("variant", ["fp32-prepacked", "fp32", "int8"])
def test_streamed_weights_give_the_fully_loaded_engines_tokens(tiny_model, tmp_path: Path,
                                                               prompts: list[str], variant: str) -> None:
    model = str(tiny_model("llama"))
    if variant == "int8":
        model = str(quantize_model(model, "int8", 32, tmp_path / "int8", show_progress=False).out)
    args = dict(model=model, dtype="float32", kv_cache_memory="16MiB", max_model_len=256,
                prepack_weights=variant == "fp32-prepacked")
    eager = LLM(**args)
    streamed = LLM(**args, stream_weights=True)
    assert _tokens(streamed, prompts[:3]) == _tokens(eager, prompts[:3])
    engine = streamed.llm_engine
    assert engine.layer_load.done and engine.model.pending_layers is None
    # Decode-only steps take the same path once every layer is in (the fused C step where built).
    assert (engine.runner.fused is None) == (eager.llm_engine.runner.fused is None)
    assert engine.prepacked_bytes == eager.llm_engine.prepacked_bytes
    assert (engine.prepacked_bytes > 0) == (variant == "fp32-prepacked")


def test_a_layer_that_cannot_be_read_fails_the_forward_with_a_clear_error(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), folder)
    model, _, _, layers = load_model(folder, torch.float32, torch.device("cpu"), 256)
    for file in folder.glob("*.safetensors"):
        file.unlink()  # gone before the layers are read
    layers.start()
    with pytest.raises(ConfigError, match="loading the weights of layer 0 failed: cannot read"):
        layers.wait(0)
    assert model.pending_layers is layers and not layers.done


def test_a_checkpoint_missing_a_layer_tensor_is_refused_before_anything_streams(tiny_model,
                                                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), folder)
    file = next(folder.glob("*.safetensors"))
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="lacks 1 tensors, e.g. layers.1.mlp.down_proj"):
        LLM(model=str(folder), dtype="float32", kv_cache_memory="16MiB", stream_weights=True)
