"""Load a Llama-family model from a Hugging Face folder (config.json + *.safetensors).

Safetensors files are memory-mapped and copied tensor by tensor into the model's own
parameters, so peak memory is the model plus one tensor, never two full copies. The decoder
layers load last, all at once or streamed in order while the engine serves (`LayerLoad`).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from llmscale.config import ConfigError, ModelConfig, activation_dtype
from llmscale.model.layers import RotaryEmbedding, cast_dense_weights, choose_methods
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
               tp_rank: int = 0, tp_size: int = 1, stage: int = 0, stages: int = 1
               ) -> tuple[LlamaForCausalLM, ModelConfig, float, LayerLoad]:
    """Build the model and fill every weight but the decoder layers', whose tensors are checked
    present and left to the returned `LayerLoad` (run it, or start it to serve while it loads).
    Returns (model, config, load seconds so far, the layers' load)."""
    start = time.perf_counter()
    cfg = read_model_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors files in {folder}")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_position, tp_rank, tp_size, stage, stages)
    model.to_empty(device=device)
    model.to(activation_dtype(dtype, device))
    cast_dense_weights(model, dtype)  # a no-op unless activations differ (bf16 weights on AVX2)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)  # fp32 tables, built for real after the meta init
    by_layer: list[list[CheckpointTensor]] = [[] for _ in model.layers]
    rest: list[CheckpointTensor] = []
    loaded: set[int] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"cannot read {file}: {str(e).splitlines()[0]}") from None
        for name in names:
            target = model.param_for_checkpoint_name(name)
            if target is None:
                continue
            module, param, shard = target
            loaded.add(id(param) * 8 + shard)
            layer = _layer_index(name)
            into = rest if layer is None else by_layer[layer - model.layer_range.start]
            into.append(CheckpointTensor(file, name, module, param, shard))
    missing = _missing_params(model, loaded)
    if missing:
        raise ConfigError(f"checkpoint in {folder} lacks {len(missing)} tensors, e.g. {missing[0]}")
    _copy_tensors(rest)
    for module in dict.fromkeys((model.embed_tokens, model.lm_head)):  # once when they are tied
        if module is not None:  # a pipeline stage holds either, both or neither
            _prepare_quantized(module)
            choose_methods(module, model.activation_dtype)
    model.eval()
    return model, cfg, time.perf_counter() - start, LayerLoad(model, by_layer)


def _layer_index(name: str) -> int | None:
    """'model.layers.12.mlp.up_proj.weight' -> 12; None outside the decoder layers."""
    head, sep, tail = name.removeprefix("model.").partition("layers.")
    if head or not sep:
        return None
    index = tail.split(".", 1)[0]
    return int(index) if index.isdigit() else None


class CheckpointTensor(NamedTuple):
    """A checkpoint tensor and where it goes in the model."""

    file: Path
    name: str
    module: nn.Module
    param: torch.Tensor
    shard: int


def _copy_tensors(tensors: list[CheckpointTensor]) -> None:
    """Copy checkpoint tensors into the model's parameters, a file open at a time; a parallel
    module's rank reads only its part of each tensor from the mapped file."""
    for file, group in itertools.groupby(tensors, key=lambda t: t.file):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for t in group:
                    if hasattr(t.module, "checkpoint_part"):
                        stored = f.get_slice(t.name)
                        part = stored[t.module.checkpoint_part(tuple(stored.get_shape()), t.shard)]
                        t.module.load_shard(t.param, part, t.shard)
                    else:
                        t.param.data.copy_(f.get_tensor(t.name))
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"cannot read {file}: {str(e).splitlines()[0]}") from None


def _prepare_quantized(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, QuantizedWeight):
            m.prepare()


class LayerLoad:
    """The decoder layers' weights, loaded in order: `run()` loads them all now; `start()` loads
    them on a thread of its own while the engine serves, and the model's forward waits for each
    layer in turn (`wait`), so a request's first layers run while its last ones are read.
    `finish(layer)` runs on each layer once its tensors are in and chooses its linears' methods
    (default: `choose_methods` without prepacking; the engine's prepacks where that pays); the
    bytes it returns add up in `finished_bytes`."""

    def __init__(self, model: LlamaForCausalLM, tensors: list[list[CheckpointTensor]]) -> None:
        self.model = model
        self.tensors = tensors  # per layer
        self.finished_bytes = 0
        self.ready = 0  # layers loaded and finished, in order
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.changed = threading.Condition()

    def run(self, finish: Callable[[nn.Module], int] | None = None) -> None:
        start = time.perf_counter()
        for i, (layer, tensors) in enumerate(zip(self.model.layers, self.tensors, strict=True)):
            _copy_tensors(tensors)
            _prepare_quantized(layer)
            if finish is None:
                choose_methods(layer, self.model.activation_dtype)
            else:
                self.finished_bytes += finish(layer)
            with self.changed:
                self.ready = i + 1
                self.changed.notify_all()
        self.seconds = time.perf_counter() - start

    def start(self, finish: Callable[[nn.Module], int] | None = None) -> None:
        self.model.pending_layers = self
        threading.Thread(target=self._stream, args=(finish,), name="llmscale-layer-load", daemon=True).start()

    def _stream(self, finish: Callable[[nn.Module], int] | None) -> None:
        try:
            self.run(finish)
        except BaseException as e:  # noqa: BLE001 (handed to the thread that waits)
            with self.changed:
                self.error = e
                self.changed.notify_all()

    @property
    def done(self) -> bool:
        return self.ready == len(self.tensors)

    def wait(self, index: int) -> None:
        """Block until layer `index` is loaded; raise what stopped the load, if anything did."""
        with self.changed:
            self.changed.wait_for(lambda: self.ready > index or self.error is not None)
        if self.ready <= index:
            raise ConfigError(f"loading the weights of layer {index} failed: {self.error}")


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
