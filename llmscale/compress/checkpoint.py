"""Read and write compressed models as plain Hugging Face folders.

Our model packs q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; on disk every tensor has
its HF name, so the folder loads both in our engine and in transformers. Compression code works on
that HF-named tensor dict (`hf_tensors`), which is where shapes are easiest to change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from llmscale.config import ConfigError, ModelConfig
from llmscale.model.layers import RotaryEmbedding, choose_methods
from llmscale.model.llama import LlamaForCausalLM

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_raw_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {folder / 'config.json'}: {e}") from None


def load_model(model: str | None, dtype: torch.dtype = torch.float32
               ) -> tuple[LlamaForCausalLM, Path]:
    """Load MODEL (None: the built-in default) on the CPU. Returns (model, its HF folder)."""
    from llmscale.model.loader import load_model as load_folder
    from llmscale.model.loader import read_model_config
    from llmscale.model.lookup import resolve_model

    folder = resolve_model(model)
    cfg = read_model_config(folder)
    if getattr(cfg, "quantization", None):
        raise ConfigError(f"{folder} holds quantized weights; prune or distil the unquantized model")
    net, _, _, layers = load_folder(folder, dtype, torch.device("cpu"), cfg.max_position_embeddings)
    layers.run()
    return net, folder


def _unpacked_names() -> dict[str, list[str]]:
    """Our packed module fragment -> the HF fragments in shard order."""
    out: dict[str, list[str]] = {}
    for hf, (ours, index) in sorted(LlamaForCausalLM.packed_modules.items(), key=lambda kv: kv[1]):
        out.setdefault(ours, []).insert(index, hf)
    return out


def hf_tensors(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under their HF checkpoint names, packed matrices split apart."""
    unpack = _unpacked_names()
    out: dict[str, torch.Tensor] = {}
    # named_parameters skips the tied lm_head (it is embed_tokens), as HF checkpoints do.
    for name, param in model.named_parameters():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        prefix = "" if name.startswith("lm_head.") else "model."
        packed = next((k for k in unpack if f".{k}." in f".{name}"), None)
        tensor = param.detach()
        if packed is None:
            out[prefix + name] = tensor
            continue
        for part, piece in zip(unpack[packed], tensor.split(module.output_sizes, dim=0), strict=True):
            out[prefix + f"{module_name.replace(packed, part)}.{attr}"] = piece
    return out


def build_model(raw_config: dict[str, Any], tensors: dict[str, torch.Tensor] | None,
                dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A CPU model for `raw_config` (an HF config dict), filled from HF-named `tensors` if given
    (every parameter must be covered), else left for the caller to initialise."""
    cfg = ModelConfig.from_hf(raw_config)
    cfg.validate()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, cfg.max_position_embeddings)
    model.to_empty(device="cpu")
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(torch.device("cpu"))
    if tensors is None:
        return model
    covered: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        target = model.param_for_checkpoint_name(name)
        if target is None:
            continue
        module, param, shard = target
        if hasattr(module, "load_shard"):
            module.load_shard(param, tensor, shard)
        else:
            param.data.copy_(tensor)
        covered.add((id(param), shard))
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            for shard in range(len(getattr(module, "output_sizes", [None]))):
                if (id(p), shard) not in covered:
                    raise ConfigError(f"no tensor for {name}.{pname} (shard {shard})")
    choose_methods(model, dtype)
    return model.eval()


def save_tensors(tensors: dict[str, torch.Tensor], out_dir: str | Path, source_folder: Path,
                 config_updates: dict[str, Any] | None = None) -> Path:
    """Write an HF folder: model.safetensors, source's config.json with `config_updates`
    applied, and the source's tokenizer and generation files."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.resolve() == source_folder.resolve():
        raise ConfigError(f"output folder {out} is the source model's folder; choose another")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # the loader reads every *.safetensors in the folder
    dtypes = {t.dtype for t in tensors.values()}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config = read_raw_config(source_folder)
    config.update(config_updates or {})
    if len(dtypes) == 1 and (dt := next(iter(dtypes))) in _DTYPE_NAMES:
        config["torch_dtype"] = _DTYPE_NAMES[dt]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in SIDE_FILES:
        if (source_folder / name).is_file():
            shutil.copy(source_folder / name, out / name)
    return out


def save_model(model: LlamaForCausalLM, out_dir: str | Path, source_folder: Path,
               config_updates: dict[str, Any] | None = None) -> Path:
    """Save our model as an HF folder that both our loader and transformers load."""
    return save_tensors(hf_tensors(model), out_dir, source_folder, config_updates)


def shape_updates(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields that describe a model's shape (head_dim explicit: once heads are
    removed, hidden_size / num_attention_heads no longer gives it)."""
    return {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim}
