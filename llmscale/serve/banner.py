"""What `llmscale serve` tells the person who started it, as vLLM, uvicorn and llama.cpp do: the
model and dtype, the kernels it runs on, the KV cache's size, the URL once it listens, and when it
stops. Plain lines on stderr (`console.status`), a few of them, the same in a terminal and a log.
"""

from __future__ import annotations

import os
import socket

import torch
import uvicorn

from llmscale.config import ParallelConfig, cpu_flags, cpu_isa
from llmscale.console import status
from llmscale.engine.llm_engine import LLMEngine
from llmscale.engine.runner import kv_bytes_per_block
from llmscale.kernels import cpu as cpu_kernels

# CPU features that decide the CPU path: the C kernels need AVX2 and FMA and are built with
# -march=native (AVX-512 where there is one); bf16 math picks the `auto` dtype (config.py).
# LLMSCALE_CPU_ISA removes the flags above the level it forces, and the line says so.
SHOWN_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_line(engine: LLMEngine) -> str:
    weights = _dtype_name(engine.dtype)
    quant = engine.model_config.quantization
    if quant is not None:
        weights = f"int{quant.bits}" + (f" (groups of {quant.group_size})" if quant.group_size else "")
    computes = _dtype_name(engine.model.activation_dtype)
    dtype = weights if weights == computes else f"{weights} weights computing in {computes}"
    parallel = engine.config.parallel
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    cp = parallel.context_parallel_size
    splits = ([f"tensor parallel over {tp} ranks"] if tp > 1 else []) + (
        [f"{pp} pipeline stages"] if pp > 1 else []) + (
        [f"context parallel over {cp} ranks (chunks of {parallel.context_parallel_min_tokens}+ tokens)"]
        if cp > 1 else [])
    split = f", {' x '.join(splits)} ({parallel.distributed_executor_backend})" if splits else ""
    return (f"llmscale serve: {engine.model_name}, {dtype} on {engine.device}{split}, context "
            f"{engine.max_model_len} tokens, loaded in {engine.startup_time_s:.1f} s")


def cpu_kernels_path() -> str:
    """Which ops run the CPU decode path, and why torch's where they are not llmscale's."""
    flags = cpu_flags()
    features = " ".join(f.upper() for f in SHOWN_CPU_FLAGS if f in flags) or "no AVX2"
    if cpu_isa() != "native":
        features += f", capped by LLMSCALE_CPU_ISA={cpu_isa()}"
    if cpu_kernels.available():
        return f"llmscale C kernels ({features})"
    if os.environ.get("LLMSCALE_CPU_KERNELS") == "0":
        why = "off by LLMSCALE_CPU_KERNELS=0"
    elif cpu_isa() == "none":
        why = "off by LLMSCALE_CPU_ISA=none"
    else:
        why = "unavailable: they need AVX2, FMA and a C compiler"
    return f"torch's ops, llmscale C kernels {why} (CPU: {features})"


def kernels_line(engine: LLMEngine) -> str:
    if engine.device.type == "cuda":
        graphs = "eager decode steps" if engine.config.enforce_eager else "decode steps replay CUDA graphs"
        return f"  kernels:  CUDA on {torch.cuda.get_device_name(engine.device)}, {graphs}"
    bind = engine.config.cpu_threads_bind
    n = torch.get_num_threads()
    threads = f"{n} thread{'s' * (n != 1)}" + (" per rank" if engine.workers is not None else "")
    threads += f" pinned to cores {bind}" if bind else ""
    line = f"  kernels:  {cpu_kernels_path()}, {threads}"
    if engine.prepacked_bytes:
        line += f"; weights prepacked for the GEMM (+{_size(engine.prepacked_bytes)})"
    return line


def kv_cache_line(engine: LLMEngine) -> str:
    blocks, block_size = engine.num_blocks, engine.config.cache.block_size
    dtype = engine.runner.kv_dtype
    parallel = engine.config.parallel
    held = blocks * kv_bytes_per_block(engine.model_config, block_size, dtype, parallel.tensor_parallel_size,
                                       len(engine.model.layers))
    return (f"  KV cache: {blocks} blocks x {block_size} tokens = {blocks * block_size} tokens, "
            f"{_size(held)} {_dtype_name(dtype)}" + _where_held(parallel))


def _where_held(parallel: ParallelConfig) -> str:
    """Every tensor-parallel rank holds as much KV cache; pipeline stages hold their layers'."""
    if parallel.pipeline_parallel_size > 1:
        return " on rank 0 (stage 0's layers)"
    return " per rank" if parallel.world_size > 1 else ""


def announce_engine(engine: LLMEngine) -> None:
    for line in (model_line(engine), kernels_line(engine), kv_cache_line(engine)):
        status(line)


class AnnouncingServer(uvicorn.Server):
    """uvicorn's server, saying where it listens once it does, and when it starts to stop."""

    def __init__(self, config: uvicorn.Config, model_name: str) -> None:
        super().__init__(config)
        self.model_name = model_name

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            # The bound port, not the configured one: --port 0 asks for any free port.
            port = self.servers[0].sockets[0].getsockname()[1]
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            status(f'llmscale serve: ready at http://{host}:{port}/v1 as model "{self.model_name}" '
                   "(Ctrl-C to stop)")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        status(f"llmscale serve: shutting down, finishing requests in flight (up to "
               f"{self.config.timeout_graceful_shutdown:g} s)")
        await super().shutdown(sockets)
