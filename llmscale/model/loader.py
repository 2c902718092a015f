"""Load a Llama-family model from a Hugging Face folder (config.json + *.safetensors).

Safetensors files are memory-mapped and copied tensor by tensor into the model's own
parameters, so peak memory is the model plus one tensor, never two full copies.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmscale.config import ConfigError, ModelConfig, activation_dtype
from llmscale.model.layers import RotaryEmbedding, cast_dense_weights
from llmscale.model.llama import LlamaForCausalLM
from llmscale.model.quant import QuantizedWeight

log = logging.getLogger(__name__)


def read_model_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {folder}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    cfg = ModelConfig.from_hf(raw)
    cfg.validate()
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if e is not None and e not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(int(e))
    return cfg


def load_model(folder: Path, dtype: torch.dtype, device: torch.device, max_position: int,
               tp_rank: int = 0, tp_size: int = 1) -> tuple[LlamaForCausalLM, ModelConfig, float]:
    """Build the model and fill its weights. Returns (model, config, load seconds)."""
    start = time.perf_counter()
    cfg = read_model_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors files in {folder}")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_position, tp_rank, tp_size)
    model.to_empty(device=device)
    model.to(activation_dtype(dtype, device))
    cast_dense_weights(model, dtype)  # a no-op unless activations differ (bf16 weights on AVX2)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)  # fp32 tables, built for real after the meta init
    loaded: set[int] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    target = model.param_for_checkpoint_name(name)
                    if target is None:
                        continue
                    module, param, shard = target
                    tensor = f.get_tensor(name)
                    if hasattr(module, "load_shard"):
                        module.load_shard(param, tensor, shard)
                    else:
                        param.data.copy_(tensor)
                    loaded.add(id(param) * 8 + shard)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"cannot read {file}: {str(e).splitlines()[0]}") from None
    missing = _missing_params(model, loaded)
    if missing:
        raise ConfigError(f"checkpoint in {folder} lacks {len(missing)} tensors, e.g. {missing[0]}")
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            module.prepare()
    model.eval()
    return model, cfg, time.perf_counter() - start


def _missing_params(model: LlamaForCausalLM, loaded: set[int]) -> list[str]:
    missing = []
    for name, module in model.named_modules():
        shards = len(getattr(module, "output_sizes", [None]))
        for pname, p in module.named_parameters(recurse=False):
            for shard in range(shards):
                if id(p) * 8 + shard not in loaded:
                    missing.append(f"{name}.{pname}")
                    break
    return missing
