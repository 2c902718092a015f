"""The roofline: FLOPs and bytes of one engine step from the architecture, this machine's
measured peaks, and which of the two a measured step is bound by.

A step is a list of chunks, one per scheduled request: `context` tokens already in its KV
cache, `new` tokens computed now (1 for a decode), and whether it samples (reaches the end
of its known tokens, so the LM head runs for it).

FLOPs: 2 per weight per token through every linear, 2 * vocab * hidden per sampled row for
the LM head, and 4 * heads * head_dim per (query, key) pair for attention (QK^T and PV),
counting the causal pairs only. Bytes: every weight read once per step (the LM head only
when a row samples), each chunk's whole K/V context read once per layer and its new K/V
written once. Activations and the embedding-row gathers are left out: at these sizes they
are small next to weights and KV.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmscale.config import ModelConfig


@dataclass(frozen=True)
class Chunk:
    context: int  # tokens already in the cache
    new: int  # tokens computed this step
    samples: bool  # the LM head runs for this chunk's last token


@dataclass(frozen=True)
class CostModel:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    linear_params: int  # weights of every decoder linear (q, k, v, o, gate, up, down), all layers
    body_weight_bytes: int  # bytes read per step besides the LM head: linears, norms, biases
    lm_head_bytes: int
    kv_elem_bytes: int

    @classmethod
    def from_config(cls, cfg: ModelConfig, weight_elem_bytes: int, kv_elem_bytes: int,
                    body_weight_bytes: int | None = None, lm_head_bytes: int | None = None) -> CostModel:
        """Weight bytes default to dense weights of `weight_elem_bytes` each; a loaded model can
        pass its real ones (quantized weights and their scales)."""
        h, d = cfg.hidden_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
        linear = cfg.num_hidden_layers * per_layer
        norms = cfg.num_hidden_layers * (2 * h + (2 * d if cfg.qk_norm else 0)) + h
        biases = cfg.num_hidden_layers * (q + 2 * kv) if cfg.attention_bias else 0
        body = (linear + norms + biases) * weight_elem_bytes
        head = cfg.vocab_size * h * weight_elem_bytes
        return cls(cfg.num_hidden_layers, h, cfg.num_attention_heads, cfg.num_key_value_heads, d,
                   cfg.vocab_size, linear,
                   body if body_weight_bytes is None else body_weight_bytes,
                   head if lm_head_bytes is None else lm_head_bytes, kv_elem_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_elem_bytes

    def flops(self, chunks: Sequence[Chunk]) -> float:
        tokens = sum(c.new for c in chunks)
        sampled = sum(1 for c in chunks if c.samples)
        # Query i of a chunk (0-based) sees context + i + 1 keys.
        pairs = sum(c.new * c.context + c.new * (c.new + 1) // 2 for c in chunks)
        return (2 * self.linear_params * tokens + 2 * self.vocab_size * self.hidden_size * sampled
                + 4 * self.num_layers * self.num_heads * self.head_dim * pairs)

    def bytes(self, chunks: Sequence[Chunk]) -> float:
        if not chunks:
            return 0.0
        weights = self.body_weight_bytes + (self.lm_head_bytes if any(c.samples for c in chunks) else 0)
        kv_read = sum(c.context + c.new for c in chunks) * self.kv_bytes_per_token
        kv_write = sum(c.new for c in chunks) * self.kv_bytes_per_token
        return weights + kv_read + kv_write


@dataclass(frozen=True)
class Peaks:
    matmul_flops: float  # FLOP/s of a large square GEMM in the profiled dtype
    copy_bytes: float  # bytes/s of a large tensor copy (read + write)
    read_bytes: float  # bytes/s of a large tensor sum (read only)
    dtype: str
    matmul_size: int
    buffer_bytes: int

    @property
    def memory_bytes(self) -> float:
        """The memory roof: the faster of the two streaming measurements."""
        return max(self.copy_bytes, self.read_bytes)

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the two roofs meet."""
        return self.matmul_flops / self.memory_bytes


def classify(intensity: float, ridge: float) -> str:
    """Roofline label: below the ridge the memory roof is the lower one."""
    return "compute" if intensity >= ridge else "memory"


def attainable(intensity: float, peaks: Peaks) -> float:
    return min(peaks.matmul_flops, intensity * peaks.memory_bytes)


def best_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Fastest of `repeats` timed calls after one warm-up: the least disturbed by other load."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _gemm_seconds(n: int, dtype: Any, device: Any, repeats: int, sync: Callable[[], None]) -> float:
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return best_time(lambda: torch.mm(a, b, out=c), repeats, sync)


def measure_peaks(dtype: Any, device: Any, matmul_size: int = 2048, buffer_bytes: int = 256 * 2**20,
                  repeats: int = 5) -> Peaks:
    """Peak GEMM FLOP/s and streaming bandwidth of this machine, measured with torch."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    n = matmul_size
    gemm_s = _gemm_seconds(n, dtype, device, repeats, sync)
    # fp32 buffers far larger than any cache, so both numbers are DRAM's.
    numel = buffer_bytes // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = best_time(lambda: dst.copy_(src), repeats, sync)
    read_s = best_time(lambda: src.sum(), repeats, sync)
    return Peaks(matmul_flops=2 * n**3 / gemm_s, copy_bytes=2 * numel * 4 / copy_s,
                 read_bytes=numel * 4 / read_s, dtype=str(dtype).removeprefix("torch."),
                 matmul_size=n, buffer_bytes=numel * 4)


def plot_roofline(points: Sequence[dict[str, Any]], peaks: Peaks, path: Any, title: str) -> None:
    """Log-log roofline with measured points; each point: label, intensity, flops, kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    intensities = [p["intensity"] for p in points] + [peaks.ridge]
    lo, hi = min(intensities) / 4, max(intensities) * 4
    x = np.logspace(np.log10(lo), np.log10(hi), 200)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.plot(x, np.minimum(peaks.matmul_flops, x * peaks.memory_bytes) / 1e9, color="black", lw=2,
            label=f"roof: {peaks.matmul_flops / 1e9:.0f} GFLOP/s, {peaks.memory_bytes / 1e9:.1f} GB/s")
    ax.axvline(peaks.ridge, color="gray", ls=":", lw=1)
    ax.annotate(f"ridge {peaks.ridge:.1f} FLOP/B", (peaks.ridge, peaks.matmul_flops / 1e9),
                textcoords="offset points", xytext=(4, -14), fontsize=8, color="gray")
    markers = {"prefill": "s", "decode": "o", "mixed": "D"}
    colors = {"workload": "tab:red", "sweep": "tab:blue"}
    seen: set[tuple[str, str]] = set()
    for p in points:
        key = (p["source"], p["phase"])
        ax.scatter(p["intensity"], p["flops"] / 1e9, marker=markers.get(p["phase"], "o"),
                   color=colors.get(p["source"], "tab:gray"), s=60 if p["source"] == "workload" else 25,
                   alpha=0.9, zorder=3, label=None if key in seen else f"{p['source']} {p['phase']}")
        seen.add(key)
        if p.get("annotate"):
            ax.annotate(p["label"], (p["intensity"], p["flops"] / 1e9), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
