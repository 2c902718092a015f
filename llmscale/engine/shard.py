"""One rank's model, loaded and prepared, and the size of its KV cache: what `LLMEngine` builds
for itself and a worker rank for its part (`parallel/workers.py`)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmscale.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    available_memory_bytes,
    parse_memory,
)
from llmscale.engine.runner import kv_bytes_per_block
from llmscale.kernels import cpu as cpu_kernels
from llmscale.model import layers
from llmscale.model.loader import LayerLoad, load_model


class Phases:
    """Consecutive timed phases: each `lap` closes the one running since the last."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.mark
        self.mark = now


def kv_cache_blocks(cache: CacheConfig, model_cfg: ModelConfig, kv_dtype: torch.dtype,
                    max_model_len: int, tp_size: int = 1, num_layers: int | None = None) -> int:
    """How many KV blocks `cache` asks for (a size, or a fraction of free memory now) on a rank of
    `tp_size` tensor-parallel ranks holding `num_layers` layers (default all); a one-line error
    when they hold less than one request of `max_model_len`."""
    if cache.num_gpu_blocks_override:
        num_blocks = cache.num_gpu_blocks_override
    else:
        per_block = kv_bytes_per_block(model_cfg, cache.block_size, kv_dtype, tp_size, num_layers)
        num_blocks = parse_memory(cache.kv_cache_memory, available_memory_bytes()) // per_block
    if num_blocks * cache.block_size < max_model_len:
        raise ConfigError(
            f"KV cache holds {num_blocks * cache.block_size} tokens ({num_blocks} "
            f"block{'s' if num_blocks != 1 else ''} of {cache.block_size}), less than one request of "
            f"max_model_len {max_model_len}; "
            f"raise --kv-cache-memory or lower --max-model-len")
    return num_blocks


def prepack_wanted(wanted: bool | None, model: torch.nn.Module, device: torch.device,
                   dtype: torch.dtype) -> bool:
    """Whether to copy the dense weights into a GEMM's packed layout: if asked, or by default
    where it is cheap. fp32 weights, and bf16 ones where the CPU multiplies bf16 pairs."""
    bf16_pairs = dtype == torch.bfloat16 and cpu_kernels.pair_panels_available()
    if wanted is False or device.type != "cpu" or not (dtype == torch.float32 or bf16_pairs):
        return False
    return wanted is True or layers.dense_linear_bytes(model) * 8 <= available_memory_bytes()


@dataclass
class RankModel:
    """One rank's model (the whole model at world size 1), loaded and prepared."""

    model: Any
    model_config: ModelConfig
    load_time_s: float
    layer_load: LayerLoad
    prepacked_bytes: int  # so far: streamed layers add theirs to layer_load.finished_bytes
    kv_capacity: int  # KV blocks its cache memory holds
    kv_dtype: torch.dtype  # what they store


def load_rank_model(config: EngineConfig, model_path: Path, max_model_len: int, rank: int = 0,
                    phases: Phases | None = None) -> RankModel:
    """Load rank `rank`'s part of the weights (its pipeline stage's layers, its tensor-parallel
    shard of each), prepack them where that pays, and size its KV cache; with
    `config.stream_weights` the decoder layers go on loading on a thread."""
    device, dtype = config.torch_device, config.torch_dtype
    kv_dtype = config.kv_dtype  # before loading: fp8 is refused here
    parallel = config.parallel
    stage, tp_rank = parallel.place(rank)
    tp_size = parallel.tensor_parallel_size
    model, model_config, load_time_s, layer_load = load_model(
        model_path, dtype, device, max_model_len, tp_rank, tp_size, stage, parallel.pipeline_parallel_size)
    if not config.stream_weights:
        layer_load.run()
        load_time_s += layer_load.seconds
    if phases is not None:
        phases.lap("weights")
    # Prepacking chooses the linears' methods again, with packed copies: the lm_head's and each
    # decoder layer's (as it arrives, when streamed); never the input embedding's, which is only
    # looked up.
    prepack = prepack_wanted(config.prepack_weights, model, device, dtype)
    act = model.activation_dtype
    prepacked = 0
    if prepack and model.lm_head is not None:
        prepacked = layers.choose_methods(model.lm_head, act, prepack=True)
    if config.stream_weights:
        layer_load.start(functools.partial(layers.choose_methods, activation_dtype=act, prepack=True)
                         if prepack else None)
    elif prepack:
        prepacked += sum(layers.choose_methods(layer, act, prepack=True) for layer in model.layers)
    if phases is not None:
        phases.lap("prepack")
    capacity = kv_cache_blocks(config.cache, model_config, kv_dtype, max_model_len, tp_size,
                               len(model.layers))
    return RankModel(model, model_config, load_time_s, layer_load, prepacked, capacity, kv_dtype)
