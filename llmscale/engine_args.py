"""The engine's flags in one place, as vLLM's `EngineArgs`: one dataclass lists every flag
(its name, type, help, choices, group), generates the argparse flags of every command that
builds an engine (`add_cli_args`), reads them back (`from_cli_args`), and resolves them into a
validated `EngineConfig` (`create_engine_config`) before anything loads.

Defaults live once, in config.py's dataclasses: a flag left unset is None here and keeps the
config's default, which its help shows.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from llmscale.config import (
    BATCHING_POLICIES,
    DTYPE_CHOICES,
    DTYPE_HELP,
    EXECUTOR_BACKENDS,
    KV_CACHE_DTYPES,
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
)

ENGINE, PARALLEL = "engine", "parallelism"
CONFIG_SECTIONS = (EngineConfig, CacheConfig, SchedulerConfig, ParallelConfig)


def flag(help: str, group: str = ENGINE, kind: type = str, choices: tuple[str, ...] | None = None,
         metavar: str | None = None, short: str | None = None, show_default: bool = True) -> Any:
    """A field of `EngineArgs`: unset (None) unless given on the command line."""
    return field(default=None, metadata={"help": help, "group": group, "kind": kind, "choices": choices,
                                         "metavar": metavar, "short": short, "show_default": show_default})


def config_default(name: str) -> Any:
    """The default a config dataclass gives the engine argument `name` (MISSING: none)."""
    for section in CONFIG_SECTIONS:
        for f in fields(section):
            if f.name == name:
                return f.default
    return MISSING


@dataclass
class EngineArgs:
    model: str | None = flag("HF folder or .gguf file (default: built-in SmolLM2-135M-Instruct)",
                             show_default=False)
    dtype: str | None = flag(DTYPE_HELP, choices=DTYPE_CHOICES, show_default=False)
    device: str | None = flag("cpu or cuda (default: cuda if available)", show_default=False)
    keep_quantized: bool | None = flag("serve a GGUF's Q8_0/Q4_0/Q4_1 weights with int8/int4 kernels instead "
                                       "of dequantizing them", kind=bool)
    prepack_weights: bool | None = flag(
        "keep a copy of fp32 CPU weights packed for a faster GEMM (the C kernels' panels, else oneDNN's "
        "layout) for faster batched linears (default: when it takes at most 1/8 of free memory)",
        kind=bool, show_default=False)
    stream_weights: bool | None = flag("start serving before every layer's weights are loaded: layers load "
                                       "in order while the first request runs through them (CPU)", kind=bool)
    cpu_threads_bind: str | None = flag(
        "pin the engine's threads to these cores, one each (0-1, 0,2,4); with several ranks one list per "
        "rank, separated by | (0-7|8-15); default: no pinning", metavar="CORES", show_default=False)
    log_steps: str | None = flag("append one JSON line per engine step to FILE: when it ended, its seconds, "
                                 "and each scheduled request's [cached tokens, new tokens, samples]",
                                 metavar="FILE", show_default=False)
    enforce_eager: bool | None = flag("on a GPU, run every step eagerly instead of replaying CUDA graphs for "
                                      "decodes", kind=bool)
    max_model_len: int | None = flag("context window (default: the model's)", kind=int, show_default=False)
    kv_cache_memory: str | None = flag("KV cache size: bytes (2GiB, 512MB) or a fraction of free memory")
    block_size: int | None = flag("tokens per KV block", kind=int)
    kv_cache_dtype: str | None = flag(
        "what K/V are stored in (auto: the activations' dtype); bfloat16 holds twice the tokens and "
        "halves attention's reads; fp8 only in `simulate`/`plan` on catalogue hardware",
        choices=KV_CACHE_DTYPES)
    max_num_batched_tokens: int | None = flag("token budget per step (default: 2048; `serve` on CPU: 512)",
                                              kind=int, show_default=False)
    max_num_seqs: int | None = flag("max requests running at once", kind=int)
    batching: str | None = flag("batching policy", choices=BATCHING_POLICIES)
    enable_prefix_caching: bool | None = flag("reuse the KV blocks of prompt prefixes seen before", kind=bool)
    enable_chunked_prefill: bool | None = flag("split long prompts over steps, beside running decodes",
                                               kind=bool)
    tensor_parallel_size: int | None = flag(
        "split every layer over T ranks, one process each, joined by torch.distributed (gloo on CPU, NCCL "
        "on GPU)", PARALLEL, int, metavar="T", short="-tp")
    pipeline_parallel_size: int | None = flag(
        "split the layers into P stages of T ranks each, with up to P micro-batches in flight",
        PARALLEL, int, metavar="P", short="-pp")
    context_parallel_size: int | None = flag(
        "C ranks, each holding the whole model, share every long prefill chunk (ring attention); decodes "
        "and short chunks run on every rank", PARALLEL, int, metavar="C", short="-cp")
    context_parallel_min_tokens: int | None = flag("with C > 1, split prefill chunks of at least N tokens",
                                                   PARALLEL, int, metavar="N")
    distributed_executor_backend: str | None = flag(
        "where ranks 1..T*P*C-1 run: mp, local processes; ray, Ray actors in a placement group (the cluster "
        "at RAY_ADDRESS, or a local one started here)", PARALLEL, choices=EXECUTOR_BACKENDS)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, groups: tuple[str, ...] = (ENGINE, PARALLEL)
                     ) -> None:
        """The flags of `groups`, each group an argument group of `parser`."""
        made: dict[str, Any] = {}
        for f in fields(cls):
            meta = f.metadata
            if meta["group"] not in groups:
                continue
            if meta["group"] not in made:
                made[meta["group"]] = parser.add_argument_group(meta["group"])
            g = made[meta["group"]]
            names = [f"--{f.name.replace('_', '-')}", *([meta["short"]] if meta["short"] else [])]
            help_text = meta["help"]
            default = config_default(f.name)
            if meta["show_default"] and default is not MISSING and default is not None:
                help_text += f" (default: {default})"
            kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": f.name}
            if meta["kind"] is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs.update(type=meta["kind"], choices=meta["choices"], metavar=meta["metavar"])
            g.add_argument(*names, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The engine flags `args` holds (those a command did not add stay unset)."""
        return cls(**{f.name: getattr(args, f.name, None) for f in fields(cls)})

    def kwargs(self, groups: tuple[str, ...] = (ENGINE, PARALLEL)) -> dict[str, Any]:
        """The flags that were set, as `EngineConfig.from_kwargs` / `LLM` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata["group"] in groups and getattr(self, f.name) is not None}

    def create_engine_config(self) -> EngineConfig:
        """The validated config (ConfigError: one line naming the bad value), before any load."""
        return EngineConfig.from_kwargs(**self.kwargs())
