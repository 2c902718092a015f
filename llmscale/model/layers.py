"""Building blocks of a Llama-family decoder: norms, rotary embeddings, parallel-ready linears.

Linear layers are written the Megatron way (column split for q/k/v and gate/up, row split for
o/down) so tensor parallelism only has to set `tp_rank`/`tp_size`; with `tp_size == 1` they
are plain matmuls. Each parallel module says which part of a checkpoint tensor its rank holds
(`checkpoint_part`: the loader reads only that part from the memory-mapped file) and copies
that part into its parameter (`load_shard`). How a linear multiplies is its `method`
(`linear_method.choose_method`), chosen once the model's weights are loaded; until then torch's
`F.linear`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmscale.config import ConfigError, QuantConfig
from llmscale.kernels import cpu as cpu_kernels
from llmscale.model import linear_method
from llmscale.model.linear_method import LinearMethod, QuantizedLinear, TorchLinear
from llmscale.model.quant import QuantizedWeight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._c_kernel_fits(x):
            return cpu_kernels.rms_norm(x.contiguous(), self.weight, self.eps)[0]
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op instead of six: per-op dispatch is a large share of a decode step.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 as transformers does, then cast back before the weight multiply.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the decoder's residual add fused with its norm."""
        if self._c_kernel_fits(x):
            return cpu_kernels.rms_norm(x.contiguous(), self.weight, self.eps, residual.contiguous())
        total = x + residual
        return self(total), total

    def _c_kernel_fits(self, x: torch.Tensor) -> bool:
        """fp32 rows and weight, or bf16 ones (the bf16 kernel rounds as the torch path below)."""
        return (x.dim() == 2 and x.shape[1] % 8 == 0 and x.dtype == self.weight.dtype
                and cpu_kernels.usable(x, self.weight, dtypes=(torch.float32, torch.bfloat16)))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 rope scaling: long wavelengths are slowed, short kept, the middle blended."""
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, theta: float,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        steps = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu")
        inv_freq = 1.0 / (theta ** (steps / head_dim))
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, scaling)
            elif kind == "linear":
                inv_freq = inv_freq / scaling["factor"]
            else:
                raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: llama3, linear")
        self.inv_freq = inv_freq
        self.max_position = max_position
        self.build(torch.device("cpu"))

    def build(self, device: torch.device) -> None:
        """(Re)compute the fp32 cos/sin tables on `device` (after meta init or a dtype cast)."""
        t = torch.arange(self.max_position, dtype=torch.float64, device="cpu")
        freqs = torch.outer(t, self.inv_freq)  # [P, D/2]
        cos, sin = freqs.cos().float(), freqs.sin().float()
        # Full-width tables with rotate_half's sign folded into sin: x*cos + swap(x)*sin.
        self.cos = torch.cat((cos, cos), dim=-1).to(device)  # [P, D]
        self.sin = torch.cat((-sin, sin), dim=-1).to(device)
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for `positions`, [T, 1, D]; looked up once per step, not once per layer
        (every layer of a step passes the same positions tensor)."""
        if self._step is None or self._step[0] is not positions:
            self._step = (positions, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        return self._step[1], self._step[2]

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] (any heads: q and k can be rotated in one call)."""
        cos, sin = self.tables(positions)
        return _rotate(x, cos, sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, Hq, D], k: [T, Hkv, D]
        return self.rotate(positions, q), self.rotate(positions, k)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.addcmul(xf * cos, torch.cat((x2, x1), dim=-1), sin).to(dtype)


AllReduce = Callable[[torch.Tensor], None]


def torch_all_reduce(t: torch.Tensor) -> None:
    dist.all_reduce(t)


def use_all_reduce(model: nn.Module, all_reduce: AllReduce) -> None:
    """Make every module that sums partial results across tensor-parallel ranks (row-parallel
    linears, the vocabulary-parallel embedding) call `all_reduce`, chosen once per engine."""
    for module in model.modules():
        if isinstance(module, RowParallelLinear | VocabEmbedding):
            module.all_reduce = all_reduce


def use_tp_group(model: nn.Module, group: dist.ProcessGroup, all_reduce: AllReduce) -> None:
    """Make the modules that combine tensor-parallel ranks' parts do so within `group` (the
    ranks of this pipeline stage): sums through `all_reduce`, the lm_head's logits gathered on
    the group's first rank."""
    use_all_reduce(model, all_reduce)
    for module in model.modules():
        if isinstance(module, VocabEmbedding):
            module.group = group


def _part(length: int, index: int, count: int) -> slice:
    """Part `index` of `count` equal parts of a dimension of `length`."""
    size = length // count
    return slice(index * size, (index + 1) * size)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows across ranks; outputs stay sharded.

    `output_sizes` lists the logical sub-matrices packed into this one (q, k, v or gate, up):
    each is split separately so every rank holds matching slices of all of them. `shards`
    says into how many parts each is cut (default: one per rank); with fewer parts than ranks,
    consecutive ranks share a part (K and V of a model with fewer KV heads than ranks).
    `feeds_swiglu`: an MLP's gate-up linear (gate rows, then up rows), whose method may yield
    the SwiGLU activation instead of the product (`LinearMethod.fuses_swiglu`).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, quant: QuantConfig | None = None,
                 shards: list[int] | None = None, feeds_swiglu: bool = False) -> None:
        super().__init__()
        self.feeds_swiglu = feeds_swiglu
        self.shards = shards or [tp_size] * len(output_sizes)
        for s, count in zip(output_sizes, self.shards, strict=True):
            if s % count or tp_size % count and count % tp_size:
                raise ConfigError(f"output size {s} does not split into {count} parts over "
                                  f"{tp_size} tensor-parallel ranks")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.output_sizes = [s // count for s, count in zip(output_sizes, self.shards, strict=True)]
        out = sum(self.output_sizes)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        self.quant: QuantizedWeight | None = None
        if quant is None:
            self.weight = nn.Parameter(torch.empty(out, input_size), requires_grad=False)
        else:  # quantized rows of packed sub-matrices line up with their shards like dense ones
            self.quant = QuantizedWeight(out, input_size, quant.bits, quant.group_size)
            self.quant.output_sizes = self.output_sizes
        self.method = _default_method(self)

    @property
    def matmul_bias(self) -> torch.Tensor | None:
        """The bias the method adds in the matmul."""
        return self.bias

    def checkpoint_part(self, shape: tuple[int, ...], shard_id: int = 0) -> tuple[slice, ...]:
        """Which rows of checkpoint tensor `shard_id` (q, k, v; gate, up) this rank holds: the
        loader reads only those from the file."""
        count = self.shards[shard_id]
        return (_part(shape[0], self.tp_rank * count // self.tp_size, count),)

    def load_shard(self, param: torch.Tensor, part: torch.Tensor, shard_id: int = 0) -> None:
        offset = sum(self.output_sizes[:shard_id])
        param.data[offset:offset + self.output_sizes[shard_id]].copy_(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(x)


def _default_method(layer: nn.Module) -> LinearMethod:
    """A layer's method from construction until its model's load chooses one: torch's ops."""
    if layer.quant is not None:
        return QuantizedLinear(layer, layer.matmul_bias, layer.quant, dense_c_rows=0)
    return TorchLinear(layer, layer.matmul_bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial sums are all-reduced across ranks, then
    the bias added."""

    feeds_swiglu = False
    matmul_bias = None

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, quant: QuantConfig | None = None) -> None:
        super().__init__()
        if input_size % tp_size:
            raise ConfigError(f"input size {input_size} is not divisible by tensor-parallel size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.all_reduce: AllReduce = torch_all_reduce
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None
        self.quant: QuantizedWeight | None = None
        if quant is None:
            self.weight = nn.Parameter(torch.empty(output_size, input_size // tp_size), requires_grad=False)
        else:
            self.quant = QuantizedWeight(output_size, input_size // tp_size, quant.bits, quant.group_size)
        self.method = _default_method(self)

    def checkpoint_part(self, shape: tuple[int, ...], shard_id: int = 0) -> tuple[slice, ...]:
        if len(shape) == 1:  # the bias, or int8 per-output-row scales: whole on every rank
            return (slice(None),)
        # weights, int4 codes and per-group scales/zeros split along the input
        return slice(None), _part(shape[1], self.tp_rank, self.tp_size)

    def load_shard(self, param: torch.Tensor, part: torch.Tensor, shard_id: int = 0) -> None:
        param.data.copy_(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(x)
        if self.tp_size > 1:
            self.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabEmbedding(nn.Module):
    """Token embedding; also the lm_head (`project`), tied to it or not.

    Vocabulary-parallel over `tp_size` ranks: each holds a contiguous range of ceil(V / tp)
    rows (the last zero-padded). A lookup embeds the ids in its range and zeros elsewhere, then
    the ranks all-reduce; a projection computes its range's logits, gathered on the group's
    first rank only (the other ranks get no columns).
    """

    feeds_swiglu = False
    matmul_bias = None

    def __init__(self, vocab_size: int, dim: int, bits: int = 0, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.vocab_size, self.tp_rank, self.tp_size = vocab_size, tp_rank, tp_size
        self.all_reduce: AllReduce = torch_all_reduce
        self.group: dist.ProcessGroup | None = None  # the tensor-parallel ranks (None: all)
        self.rows = -(-vocab_size // tp_size)
        self.vocab_start = tp_rank * self.rows
        self.quant: QuantizedWeight | None = None
        if bits:
            self.quant = QuantizedWeight(self.rows, dim, bits)
        else:
            self.weight = nn.Parameter(torch.empty(self.rows, dim), requires_grad=False)
        self.method = _default_method(self)

    def checkpoint_part(self, shape: tuple[int, ...], shard_id: int = 0) -> tuple[slice, ...]:
        return (slice(min(self.vocab_start, shape[0]), min(self.vocab_start + self.rows, shape[0])),)

    def load_shard(self, param: torch.Tensor, part: torch.Tensor, shard_id: int = 0) -> None:
        if part.shape[0] < param.shape[0]:
            param.data.zero_()
        param.data[:part.shape[0]].copy_(part)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return F.embedding(ids, self.weight)
        # The scales carry the model's dtype (the loader casts floating tensors to it).
        return self.quant.embed(ids, self.quant.scales.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._embed(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        x = self._embed(local.masked_fill(outside, 0)).masked_fill(outside.unsqueeze(-1), 0)
        self.all_reduce(x)
        return x

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, dim] -> [N, vocab] logits (on rank 0; [N, 0] on the others)."""
        logits = self.method.apply(hidden)
        if self.tp_size == 1:
            return logits
        logits = logits.contiguous()
        if self.tp_rank:
            dist.gather(logits, None, group=self.group, group_dst=0)
            return logits[:, :0]
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.gather(logits, parts, group=self.group, group_dst=0)
        return torch.cat(parts, dim=-1)[:, :self.vocab_size]


def _dense_linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, ColumnParallelLinear | RowParallelLinear | VocabEmbedding) and m.quant is None]


def _weight_bytes(module: nn.Module) -> int:
    return module.weight.numel() * module.weight.element_size()


def cast_dense_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the dense linears' and embeddings' weights in `dtype`; norms, biases and rotary
    tables keep theirs. The linears' methods multiply such weights with activations of another
    dtype."""
    for module in _dense_linears(model):
        if module.weight.dtype != dtype:
            module.weight = nn.Parameter(module.weight.data.to(dtype), requires_grad=False)


def dense_linear_bytes(model: nn.Module) -> int:
    """Bytes of the dense weights that `choose_methods(..., prepack=True)` would copy."""
    return sum(_weight_bytes(m) for m in _dense_linears(model))


def choose_methods(model: nn.Module, activation_dtype: torch.dtype, prepack: bool = False) -> int:
    """Give every linear in `model` (a model, a decoder layer, the lm_head) its method
    (`linear_method.choose_method`), once its weights are loaded and prepared; returns the
    bytes of packed copies made. With `prepack`, the engine's choice where memory allows, fp32
    weights get a packed copy, which does not follow later changes to the weights: whoever
    changes them chooses again."""
    added = 0
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear | RowParallelLinear | VocabEmbedding):
            module.method = linear_method.choose_method(module, activation_dtype, prepack)
            if module.method.holds_copy:
                added += _weight_bytes(module)
    return added
