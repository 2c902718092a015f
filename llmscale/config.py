"""Every configuration dataclass, validated in one place.

Errors raised here are `ConfigError` with a one-line message that names the bad value;
the CLI prints them as they are.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration or input problem a user can fix; its message is one line."""


SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


QUANT_METHOD = "llmscale"
QUANT_METHODS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's weights are quantized (config.json's `quantization_config`)."""

    bits: int  # linears inside the decoder layers: 8 or 4
    group_size: int = 0  # int4 only
    embedding_bits: int = 8  # token embedding and lm_head (0: kept dense)

    @classmethod
    def from_hf(cls, raw: dict[str, Any] | None) -> QuantConfig | None:
        if not raw:
            return None
        method = raw.get("quant_method")
        if method != QUANT_METHOD:
            raise ConfigError(f"unsupported quantization {method!r}; this engine serves checkpoints "
                              f"made by `llmscale quantize` (quant_method {QUANT_METHOD!r})")
        cfg = cls(int(raw["bits"]), int(raw.get("group_size", 0)), int(raw.get("embedding_bits", 8)))
        cfg.validate()
        return cfg

    def to_hf(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "bits": self.bits, "group_size": self.group_size,
                "embedding_bits": self.embedding_bits}

    def validate(self, *input_sizes: int) -> None:
        if self.bits not in (4, 8) or self.embedding_bits not in (0, 8):
            raise ConfigError(f"quantization bits must be 8 or 4, got {self.bits}")
        if self.bits == 4:
            if self.group_size not in (32, 64, 128, 256):
                raise ConfigError(f"int4 group size must be 32, 64, 128 or 256, got {self.group_size}")
            for k in input_sizes:
                if k % self.group_size:
                    raise ConfigError(f"group size {self.group_size} does not divide the input "
                                      f"size {k} of a linear layer")


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder, read from an HF config.json (or GGUF metadata)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    quantization: QuantConfig | None = None  # weight-only int8/int4 checkpoints

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            rope_scaling = cfg.get("rope_scaling") or None
            rope_theta = cfg.get("rope_theta")
            if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):
                rope_theta = cfg["rope_parameters"].get("rope_theta")
                if cfg["rope_parameters"].get("rope_type", "default") != "default":
                    rope_scaling = cfg["rope_parameters"]
            if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
                qk_norm=family == "qwen3",
                sliding_window=_sliding_window(cfg, family),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=[int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None],
                quantization=QuantConfig.from_hf(cfg.get("quantization_config")),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None

    def context_len(self, max_model_len: int | None) -> int:
        """The context to serve: `max_model_len`, else the model's, never past a sliding window.

        No attention path masks to a window, and within one attention is exact, so a window
        smaller than the context caps the default and refuses a larger `max_model_len`.
        """
        window = self.sliding_window
        if max_model_len is not None:
            if window is not None and max_model_len > window:
                raise ConfigError(
                    f"the model attends over a sliding window of {window} tokens, which this engine "
                    f"does not apply; pass --max-model-len <= {window} (got {max_model_len})")
            return max_model_len
        if window is not None and window < self.max_position_embeddings:
            log.info("max_model_len capped to the model's sliding window of %d tokens "
                     "(context %d): attention past the window is not implemented",
                     window, self.max_position_embeddings)
            return window
        return self.max_position_embeddings

    def validate(self) -> None:
        if self.quantization is not None:
            self.quantization.validate(self.hidden_size, self.intermediate_size,
                                       self.num_attention_heads * self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


def _sliding_window(cfg: dict[str, Any], family: str) -> int | None:
    """The attention window of an HF config, or None. Qwen2 and Qwen3 configs carry one but use
    it only with `use_sliding_window`, which their transformers classes default to false."""
    window = cfg.get("sliding_window")
    use = cfg.get("use_sliding_window")
    if use is None:
        use = family not in ("qwen2", "qwen3")
    return int(window) if window is not None and use else None


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


# LLMSCALE_CPU_ISA caps the instruction sets every CPU path may use, so that one machine can run
# the paths of lesser ones: `avx2` builds and picks the AVX2 kernels on an AVX-512 CPU, `none`
# leaves the C kernels unbuilt (torch's ops everywhere). Each level drops the flags above it.
CPU_ISA_LEVELS = ("native", "avx512", "avx2", "none")
_ABOVE_AVX512 = ("amx",)
_ABOVE_AVX2 = (*_ABOVE_AVX512, "avx512")
_ABOVE_NONE = (*_ABOVE_AVX2, "avx2", "fma")


@functools.cache
def cpu_isa() -> str:
    """The level LLMSCALE_CPU_ISA forces (`native`, the default, forces none), read once."""
    value = os.environ.get("LLMSCALE_CPU_ISA", "").strip().lower() or "native"
    if value not in CPU_ISA_LEVELS:
        raise ConfigError(f"LLMSCALE_CPU_ISA={value}: expected one of {', '.join(CPU_ISA_LEVELS)}")
    return value


def flags_at_isa(flags: frozenset[str], isa: str) -> frozenset[str]:
    """`flags` less those above the level `isa` (a level above the CPU's own changes nothing)."""
    above = {"native": (), "avx512": _ABOVE_AVX512, "avx2": _ABOVE_AVX2, "none": _ABOVE_NONE}[isa]
    return frozenset(f for f in flags if not f.startswith(above))


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags, read once, less those above LLMSCALE_CPU_ISA: everything that
    picks a CPU path asks here."""
    return flags_at_isa(frozenset(_cpuinfo().get("flags", "").split()), cpu_isa())


def cpu_model_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("AMD EPYC", "Intel(R) Xeon(R) ..."), or
    the platform's processor string where there is no /proc/cpuinfo."""
    import platform

    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def cpu_has_bf16_math() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def default_dtype() -> torch.dtype:
    """bf16 where the CPU multiplies bf16 natively or on a GPU, else fp32."""
    if torch.cuda.is_available() or cpu_has_bf16_math():
        return torch.bfloat16
    return torch.float32


def activation_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of activations and the KV cache for weights of `weight_dtype`.

    A CPU without bf16 arithmetic converts bf16 to fp32 to multiply it anyway, so there
    16-bit weights keep what they are good for (half the memory, half the bytes a decode
    step streams) and everything else is fp32, as llama.cpp does with BF16/F16 weights on
    such CPUs: torch's bf16 ops are slow there, and fp32 activations lose nothing.
    """
    if device.type == "cpu" and weight_dtype != torch.float32 and not cpu_has_bf16_math():
        return torch.float32
    return weight_dtype


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp8")


def kv_cache_dtype(name: str, activations: torch.dtype) -> torch.dtype:
    """The dtype a cache of `name` (a KV_CACHE_DTYPES entry) stores for `activations`."""
    if name == "auto":
        return activations
    if name == "fp8":
        raise ConfigError("--kv-cache-dtype fp8 is for planning catalogue hardware (llmscale simulate, "
                          "llmscale plan); this engine stores K/V as float32 or bfloat16")
    return DTYPES[name]


# The --dtype flag of every command that loads a model.
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DTYPE_HELP = ("weights dtype (auto: bf16 on AVX-512 BF16/AMX CPUs and GPUs); bf16 on a CPU without "
              "bf16 arithmetic computes in fp32")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype()
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose float32 or bfloat16")
    return DTYPES[dtype]


def parse_device(spec: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or None (cuda where torch sees a GPU, else cpu)."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; choose cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {spec!r}; choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but torch sees no CUDA GPU here; use cpu")
    return device


def parse_cpu_list(spec: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]; each core must be one this process may run on."""
    cores: list[int] = []
    for part in spec.split(","):
        bounds = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if bounds is None:
            raise ConfigError(f"cannot read CPU list {spec!r}; expected e.g. 0-3 or 0,2,4")
        lo = int(bounds[1])
        cores += range(lo, int(bounds[2] or lo) + 1)
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(cores)
    if not cores or len(set(cores)) != len(cores) or not set(cores) <= allowed:
        raise ConfigError(f"CPU list {spec!r} must name distinct cores among {sorted(allowed)}")
    return cores


def parse_rank_cpu_lists(spec: str, ranks: int) -> list[list[int]]:
    """'0-1|2-3' -> [[0, 1], [2, 3]]: one CPU list per rank, as vLLM's
    VLLM_CPU_OMP_THREADS_BIND takes them; no core in two lists."""
    lists = [parse_cpu_list(part) for part in spec.split("|")]
    if len(lists) != ranks:
        raise ConfigError(f"--cpu-threads-bind {spec!r} names {len(lists)} CPU lists for {ranks} ranks; "
                          f"give one per rank, separated by |")
    flat = [c for cores in lists for c in cores]
    if len(set(flat)) != len(flat):
        raise ConfigError(f"--cpu-threads-bind {spec!r} gives a core to two ranks")
    return lists


def read_user_file(path: str | Path, what: str) -> str:
    """The text of a file the user named (`what` it is, for the message); one ConfigError line
    when it is missing or unreadable."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the {what}: {e}") from None


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as Python objects; a syntax error is one ConfigError line naming its line."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def parse_memory(value: str | int | float, available_bytes: int) -> int:
    """'2GiB', '512MB', 1e9 or a fraction like 0.3 (of `available_bytes`) -> bytes."""
    if isinstance(value, str):
        s = value.strip().lower().replace(" ", "")
        units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
                 "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
        for unit, mult in units.items():
            if s.endswith(unit):
                try:
                    return int(float(s[: -len(unit)]) * mult)
                except ValueError:
                    break
        try:
            value = float(s)
        except ValueError:
            raise ConfigError(f"cannot read memory size {value!r} (try 2GiB, 512MB or 0.3)") from None
    if value <= 0:
        raise ConfigError(f"memory size must be positive, got {value}")
    if value < 1:
        return int(value * available_bytes)
    return int(value)


def available_memory_bytes() -> int:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: str | int | float = 0.1  # bytes, "2GiB", or fraction of free memory
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None  # exact block count (tests)
    # What K/V are stored in (auto: the activations' dtype). A bf16 cache holds twice the tokens
    # in the same memory and halves the bytes a decode's attention reads, for rounding K/V to bf16;
    # fp8 is for planning catalogue hardware (`llmscale simulate`/`plan`), not stored here.
    kv_cache_dtype: str = "auto"

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; "
                              f"choose {', '.join(KV_CACHE_DTYPES)}")


EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass
class ParallelConfig:
    # Ranks that split every layer (attention heads, MLP columns/rows, vocabulary), one process
    # each: rank 0 is the engine's own process, the others are workers it starts.
    tensor_parallel_size: int = 1
    # Stages that each hold a contiguous range of the layers, T ranks each: rank r is tensor-
    # parallel rank r % T of stage r // T, so rank 0 (the engine) holds stage 0.
    pipeline_parallel_size: int = 1
    # Ranks that each hold the whole model and share long prefill chunks (ring attention);
    # chunks of at least `context_parallel_min_tokens` are split, the rest runs on every rank.
    # Shorter chunks lose: each rank still reads every weight for a part of the tokens, and
    # the ring adds a transfer per layer (BENCHMARKS.md: even from 1024 tokens here, from ~512
    # on H100s by the planner's model).
    context_parallel_size: int = 1
    context_parallel_min_tokens: int = 1024
    # Where ranks 1..T*P*C-1 run: "mp", local processes this one starts; "ray", Ray actors in a
    # placement group (one bundle per rank, so ranks may sit on different nodes).
    distributed_executor_backend: str = "mp"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size

    def place(self, rank: int) -> tuple[int, int]:
        """(pipeline stage, tensor-parallel rank within it) of global rank `rank`; every
        context-parallel rank holds the whole model, stage 0 at tensor-parallel rank 0."""
        if self.context_parallel_size > 1:
            return 0, 0
        return divmod(rank, self.tensor_parallel_size)

    def validate(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size",
                     "context_parallel_min_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context_parallel_size > 1 and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ConfigError("context_parallel_size does not combine with tensor or pipeline parallelism "
                              "yet: give one of the three")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ConfigError(f"unknown distributed_executor_backend {self.distributed_executor_backend!r}; "
                              f"choose {' or '.join(EXECUTOR_BACKENDS)}")

    def check_model(self, cfg: ModelConfig) -> None:
        """One-line errors for a model these sizes cannot split, before anything loads."""
        pp = self.pipeline_parallel_size
        if pp > cfg.num_hidden_layers:
            raise ConfigError(f"pipeline_parallel_size {pp} exceeds the model's {cfg.num_hidden_layers} "
                              f"layers (each stage holds at least one)")
        tp = self.tensor_parallel_size
        if cfg.num_attention_heads % tp:
            raise ConfigError(f"tensor_parallel_size {tp} does not divide the model's "
                              f"{cfg.num_attention_heads} attention heads")
        kv = cfg.num_key_value_heads
        if kv % tp and tp % kv:
            raise ConfigError(f"tensor_parallel_size {tp} and the model's {kv} KV heads: one must divide "
                              f"the other (fewer KV heads than ranks are replicated)")
        if cfg.intermediate_size % tp:
            raise ConfigError(f"tensor_parallel_size {tp} does not divide the MLP's intermediate size "
                              f"{cfg.intermediate_size}")
        group = cfg.quantization.group_size if cfg.quantization else 0
        for name, k in (("attention output", cfg.num_attention_heads * cfg.head_dim),
                        ("MLP down", cfg.intermediate_size)):
            if group and (k // tp) % group:  # row-parallel shards must hold whole int4 groups
                raise ConfigError(f"tensor_parallel_size {tp} cuts the {name} projection's {k} inputs into "
                                  f"parts of {k // tp}, not whole int4 groups of {group}")


def stage_layers(num_layers: int, stage: int, stages: int) -> range:
    """The contiguous layers pipeline stage `stage` of `stages` holds: equal shares, the first
    stages taking one more when they do not divide (the last stage also runs the lm_head)."""
    share, extra = divmod(num_layers, stages)
    start = stage * share + min(stage, extra)
    return range(start, start + share + (stage < extra))


BATCHING_POLICIES = ("continuous", "static", "dynamic")

# The token budget per step when none is given. Offline, big steps batch prefill best. A server
# also bounds how long one step runs: a prefill chunk stalls every running stream for that step,
# and prompts that share a step all get their first token at its end, so under a burst FCFS
# steps of a few prompts reach first tokens sooner than one big batch (Sarathi-Serve). On a
# CPU a token costs far more than on a GPU, so its server steps are shorter (budgets of 512 to
# 2,048 tokens compared in BENCHMARKS.md, "Online serving against the peers").
OFFLINE_TOKEN_BUDGET = 2048
ONLINE_TOKEN_BUDGET = {"cpu": 512, "cuda": 2048}


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int | None = None  # None: see `resolved`
    max_num_seqs: int = 128
    batching: str = "continuous"
    enable_chunked_prefill: bool = True
    static_batch_size: int = 16  # static: wait for this many requests...
    batch_timeout_s: float = 0.05  # ...or this long (static and dynamic)

    def validate(self) -> None:
        if self.batching not in BATCHING_POLICIES:
            raise ConfigError(f"unknown batching {self.batching!r}; choose {', '.join(BATCHING_POLICIES)}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")

    def resolved(self, device: torch.device, online: bool) -> SchedulerConfig:
        """This config with the default token budget filled in for a server (`online`) or not."""
        if self.max_num_batched_tokens is not None:
            return self
        budget = OFFLINE_TOKEN_BUDGET
        if online:
            budget = ONLINE_TOKEN_BUDGET.get(device.type, OFFLINE_TOKEN_BUDGET)
        return replace(self, max_num_batched_tokens=budget)


@dataclass
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None = built-in default model
    dtype: str | torch.dtype | None = None
    device: str | None = None
    max_model_len: int | None = None
    seed: int = 0
    # A GGUF's Q8_0/Q4_0/Q4_1 weights are served by the int8/int4 kernels, not dequantized.
    keep_quantized: bool = False
    # A second copy of fp32 CPU weights packed for a faster GEMM (the C kernels' panels, else
    # oneDNN's layout); None: when it takes at most 1/8 of free memory.
    prepack_weights: bool | None = None
    # Serve before the decoder layers' weights are all in: they load in order on a thread while
    # the first forward waits for each layer in turn (CPU only).
    stream_weights: bool = False
    # CPU cores to pin the step loop's OpenMP threads to, one each ("0-1", "0,2,4"); None: no
    # pinning, since two processes pinned to the same cores would share them.
    cpu_threads_bind: str | None = None
    # On a GPU, decode-only steps replay CUDA graphs (engine/cuda_graphs.py) unless this is set.
    enforce_eager: bool = False
    # Append one JSON line per engine step to this file: when it ended (Unix seconds), how long
    # it took, and each scheduled request's [cached tokens, new tokens, samples] (the planner's
    # `Chunk`s), so a real server's steps can be set beside the performance model's.
    log_steps: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments named like the CLI flags."""
        cfg = cls(model=model)
        sections = (cfg, cfg.cache, cfg.scheduler, cfg.parallel)
        for key, value in kwargs.items():
            if value is None and key != "num_gpu_blocks_override":
                continue
            target = next((s for s in sections if key in s.__dataclass_fields__), None)
            if target is None or key in ("cache", "scheduler", "parallel"):
                raise ConfigError(f"unknown engine argument {key!r}")
            setattr(target, key, value)
        cfg.cache.validate()
        cfg.scheduler.validate()
        cfg.parallel.validate()
        if cfg.cpu_threads_bind is not None:
            cfg.rank_cores(0)  # a one-line error for a list that does not fit
        parse_device(cfg.device)
        return cfg

    def rank_cores(self, rank: int) -> list[int] | None:
        """The cores rank `rank` pins its threads to (`cpu_threads_bind`: one list, or with
        several ranks one list per rank separated by |); None: no pinning."""
        if self.cpu_threads_bind is None:
            return None
        ranks = self.parallel.world_size
        if ranks == 1:
            return parse_cpu_list(self.cpu_threads_bind)
        return parse_rank_cpu_lists(self.cpu_threads_bind, ranks)[rank]

    @property
    def model_name(self) -> str:
        """The name the model is served under by default."""
        return str(self.model) if self.model else "SmolLM2-135M-Instruct"

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def activation_dtype(self) -> torch.dtype:
        return activation_dtype(self.torch_dtype, self.torch_device)

    @property
    def kv_dtype(self) -> torch.dtype:
        return kv_cache_dtype(self.cache.kv_cache_dtype, self.activation_dtype)

    @property
    def torch_device(self) -> torch.device:
        return parse_device(self.device)
