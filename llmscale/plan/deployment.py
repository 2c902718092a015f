"""What is simulated or planned: a model, the hardware under it, and the engine's settings.

`ModelSpec` is a model the engine can load (an HF folder or .gguf: its tokenizer encodes the
prompts as the server would) or an architecture alone (a config.json, or the name of one in
`plan/configs/`) for models too big to run here. `Deployment` is one replica's hardware, weight
format and parallelism, plus the replica count; from it come the step-time model, the KV
cache's size and the simulated engines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from llmscale.config import ConfigError, ModelConfig, SchedulerConfig
from llmscale.plan.calibrate import Calibration
from llmscale.plan.hardware import Hardware
from llmscale.plan.simulator import NO_HANDOFF, Handoff, SimEngine
from llmscale.plan.step_model import (
    COMPUTE_DTYPE,
    WEIGHT_BYTES,
    Coefficients,
    Geometry,
    StepModel,
    StepTimeModel,
)

if TYPE_CHECKING:
    from llmscale.bench.datasets import Codec

THIS_MACHINE = "this-machine"
# Of a GPU's memory, what the engine may use (vLLM's gpu_memory_utilization default), and what
# activations and the CUDA context take besides weights and KV (assumed; vLLM profiles it).
GPU_MEMORY_UTILIZATION = 0.9
ACTIVATION_RESERVE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: ModelConfig
    folder: Path | None  # a loadable model (weights, tokenizer); None: an architecture alone

    @classmethod
    def load(cls, spec: str | None) -> ModelSpec:
        """An HF folder or .gguf (None: the built-in model), a config.json, or a shipped
        config's name (`llama-3.1-8b`, `llama-3.1-70b`, `qwen2.5-7b`)."""
        from llmscale.model.loader import read_model_config
        from llmscale.model.lookup import resolve_model

        shipped = files("llmscale.plan") / "configs" / f"{spec}.json"
        if spec is not None and not Path(spec).exists() and shipped.is_file():
            return cls(spec, _config_json(Path(str(shipped))), None)
        if spec is not None and Path(spec).is_file() and Path(spec).suffix == ".json":
            return cls(Path(spec).parent.name or Path(spec).stem, _config_json(Path(spec)), None)
        if spec is not None and not Path(spec).exists():
            shipped_dir = files("llmscale.plan") / "configs"
            names = sorted(p.name.removesuffix(".json") for p in shipped_dir.iterdir()
                           if p.name.endswith(".json"))
            raise ConfigError(f"--model {spec}: not a model folder, .gguf, config.json or one of "
                              f"{', '.join(names)}")
        folder = resolve_model(spec)
        return cls(spec or "SmolLM2-135M-Instruct", read_model_config(folder), folder)

    def tokenizer_folder(self) -> Path:
        """Its own tokenizer's folder; an architecture alone borrows the built-in model's (only
        token counts matter then)."""
        from llmscale.model.lookup import resolve_model

        return self.folder or resolve_model(None)

    def encoder(self) -> Callable[[str], list[int]]:
        """Text -> the token ids a completions request becomes in the server."""
        from llmscale.model.tokenizer import Tokenizer

        return Tokenizer.from_folder(self.tokenizer_folder()).encode

    def codec(self) -> Codec:
        """What `bench` cuts workload prompts with."""
        from llmscale.bench.datasets import Codec

        return Codec.load(self.tokenizer_folder())


def _config_json(path: Path) -> ModelConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--model {path}: cannot read it as a config.json ({e})") from None
    cfg = ModelConfig.from_hf(raw)
    cfg.validate()
    return cfg


def this_machine(calibration: Calibration, memory_bytes: float, cost_per_hour: float) -> Hardware:
    """The calibrated machine as a catalogue entry: its measured peaks, and efficiencies of 1
    since the fitted coefficients already say what the engine reaches."""
    dtype = "bf16" if calibration.dtype == "bfloat16" else "fp32"
    description = f"{calibration.cpu}, {calibration.threads} threads (calibrated)"
    return Hardware(name=THIS_MACHINE, kind="cpu", description=description, memory_bytes=memory_bytes,
                    memory_bandwidth=calibration.peak_bandwidth, peak_flops={dtype: calibration.peak_flops},
                    interconnect_bandwidth=0.0, network_bandwidth=1.25e9, devices_per_node=1,
                    cost_per_hour=cost_per_hour, compute_efficiency=1.0, memory_efficiency=1.0,
                    interconnect_efficiency=1.0, step_overhead_s=calibration.coefficients.step_s,
                    per_seq_overhead_s=calibration.coefficients.per_seq_s)


@dataclass(frozen=True)
class Deployment:
    hardware: Hardware
    weight_format: str  # a key of step_model.WEIGHT_BYTES
    tp: int = 1
    pp: int = 1
    replicas: int = 1
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_bytes: float | None = None  # per replica; None: what the devices hold after weights
    # auto: 16 bits (fp32 where the device computes in fp32) | float32 | bfloat16 | fp8
    kv_cache_dtype: str = "auto"

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.replicas

    @property
    def cost_per_hour(self) -> float:
        return self.devices * self.hardware.cost_per_hour

    def describe(self) -> str:
        par = f" TP{self.tp}" + (f" PP{self.pp}" if self.pp > 1 else "")
        kv = "" if self.kv_cache_dtype == "auto" else f" kv-{weight_format_of_dtype(self.kv_cache_dtype)}"
        return (f"{self.replicas} x {self.hardware.name} {self.weight_format}{kv}{par}, "
                f"max_num_seqs {self.max_num_seqs}, {self.max_num_batched_tokens} tokens/step")

    def with_replicas(self, n: int) -> Deployment:
        return replace(self, replicas=n)

    def kv_elem_bytes(self) -> float:
        """The cache's dtype: as asked, else fp32 where the device computes in fp32, else 16 bits."""
        if self.kv_cache_dtype != "auto":
            return WEIGHT_BYTES[weight_format_of_dtype(self.kv_cache_dtype)]
        compute = COMPUTE_DTYPE[self.weight_format]
        return 4.0 if compute == "fp32" or not self.hardware.supports("bf16") else 2.0

    def geometry(self, model: ModelSpec) -> Geometry:
        return Geometry.of(model.config, self.weight_format, self.kv_elem_bytes(), tp=self.tp, pp=self.pp)

    def compute_peak(self) -> float:
        """The FLOP/s the linears run at: the format's compute dtype if the device has it."""
        hw = self.hardware
        dtype = COMPUTE_DTYPE[self.weight_format]
        for candidate in (dtype, "bf16", "fp32"):
            if hw.supports(candidate):
                return hw.peak_flops[candidate]
        return max(hw.peak_flops.values())

    def coefficients(self) -> Coefficients:
        """The catalogue entry's peaks times its efficiencies."""
        hw = self.hardware
        flops = self.compute_peak() * hw.compute_efficiency
        attention_peak = max(hw.peak_flops.get("bf16", 0.0), hw.peak_flops.get("fp32", 0.0))
        attention_flops = attention_peak * hw.compute_efficiency
        bandwidth = hw.memory_bandwidth * hw.memory_efficiency
        link = hw.interconnect_bandwidth if self.tp <= hw.devices_per_node else hw.network_bandwidth
        return Coefficients(step_s=hw.step_overhead_s, per_seq_s=hw.per_seq_overhead_s, per_sample_s=0.0,
                            weight_bandwidth=bandwidth, linear_flops=flops,
                            attention_s_per_flop=1.0 / attention_flops, kv_s_per_byte=1.0 / bandwidth,
                            interconnect_bandwidth=link * hw.interconnect_efficiency,
                            network_bandwidth=hw.network_bandwidth * hw.interconnect_efficiency)

    def step_model(self, model: ModelSpec, calibration: Calibration | None = None) -> StepModel:
        """On this machine: the calibration's measured curve when it was measured on this very
        model and format, else its fitted roofline on this model, plus what serving over HTTP
        added there. On catalogue hardware: its peaks times its efficiencies (their overheads
        are the entry's)."""
        if self.hardware.name == THIS_MACHINE:
            if calibration is None:
                raise ConfigError(f"{THIS_MACHINE} needs --calibration FILE "
                                  f"(make one with `llmscale profile --calibrate`)")
            engine: StepModel
            if (calibration.model, calibration.weight_format) == (model.name, self.weight_format):
                engine = calibration.curve()
            else:
                engine = StepTimeModel(calibration.coefficients, self.geometry(model))
            return calibration.served(engine)
        return StepTimeModel(self.coefficients(), self.geometry(model))

    def handoff(self, calibration: Calibration | None) -> Handoff:
        """What the server's work on a step's outputs adds to the next step: measured on this
        machine, whose cores run both; nothing on catalogue hardware, whose model runs on the
        accelerator while the host's cores serve."""
        if self.hardware.name == THIS_MACHINE and calibration is not None:
            return calibration.serving_overhead().handoff()
        return NO_HANDOFF

    def kv_blocks(self, model: ModelSpec, max_model_len: int) -> int:
        """KV blocks of one replica; a one-line error when the weights or one request do not fit."""
        g = self.geometry(model)
        per_block = self.block_size * g.kv_bytes_per_token / self.pp  # per device: its stage's layers
        weights = g.weight_bytes_per_device()
        hw = self.hardware
        if self.kv_cache_bytes is not None:
            kv_per_device = self.kv_cache_bytes / (self.tp * self.pp)
        else:
            usable = hw.memory_bytes * (GPU_MEMORY_UTILIZATION if hw.kind == "gpu" else 0.8)
            kv_per_device = usable - weights - (ACTIVATION_RESERVE_BYTES if hw.kind == "gpu" else 0)
        if weights > hw.memory_bytes or kv_per_device <= 0:
            raise ConfigError(f"{model.name} {self.weight_format} needs {weights / 2**30:.1f} GiB of weights "
                              f"per device with TP{self.tp} PP{self.pp}; {hw.name} holds "
                              f"{hw.memory_bytes / 2**30:.0f} GiB")
        blocks = int(kv_per_device // per_block)
        if blocks * self.block_size < max_model_len:
            raise ConfigError(f"{hw.name} TP{self.tp} PP{self.pp}: the KV cache holds "
                              f"{blocks * self.block_size} tokens, less than one request of "
                              f"{max_model_len}; lower --max-model-len")
        return blocks

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens,
                               max_num_seqs=self.max_num_seqs)

    def engine_factory(self, model: ModelSpec, max_model_len: int, calibration: Calibration | None = None,
                       scheduler: SchedulerConfig | None = None, num_blocks: int | None = None
                       ) -> Callable[[], SimEngine]:
        step_model = self.step_model(model, calibration)
        blocks = num_blocks or self.kv_blocks(model, max_model_len)
        sched = scheduler or self.scheduler_config()
        handoff = self.handoff(calibration)
        return lambda: SimEngine(sched, blocks, self.block_size, self.enable_prefix_caching, max_model_len,
                                 step_model, stages=self.pp, handoff=handoff)


def weight_format_of_dtype(dtype: str) -> str:
    """--dtype's name as a weight format (WEIGHT_BYTES' keys)."""
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    fmt = aliases.get(dtype, dtype)
    if fmt not in WEIGHT_BYTES:
        raise ConfigError(f"unknown weight format {dtype!r}; choose {', '.join(WEIGHT_BYTES)}")
    return fmt
