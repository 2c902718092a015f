"""How each linear layer multiplies, decided once when the model loads (vLLM's `quant_method`).

`choose_method` looks at a layer's weight (device, dtype, format), the model's activation dtype,
whether the engine prepacks, and what this CPU offers (the C kernels built or not, oneDNN): read
then, never per call. The `LinearMethod` it returns holds the prepared operand (a packed copy,
quantized blocks) and has one `apply(x) -> x @ W^T (+ bias)`. Within a method the row count still
picks a band, since a decode batch and a prefill chunk want different kernels; the bands are the
constants below. docs/architecture.md, "Which kernel runs", tabulates the result.

Why the bands (2-core AVX2 CPU, torch 2.13, all decoder linears of SmolLM2-135M in fp32):
decode steps multiply a few activation rows by every weight, so they are bound by streaming the
weights from memory, where torch falls short (1 row 56 ms as `torch.mm`, single-threaded GEMV;
8 rows 78 ms) and the row-major C kernels do not (29 ms and 48 ms; bf16 weights 19 ms and 38 ms):
they win up to ~32 rows. Without them, `W @ x^T` beats `F.linear` for 2-128 rows (a [8, 576] x
[576, 3072] product 1.4 ms against 2.7 ms: the short operand on the left makes torch repack the
weight per call). Prefill chunks are compute-bound, where oneDNN's linear is the fastest of
torch's. Faster still is a GEMM on a copy of the weight packed for it: the C kernels' own panel
layout (`cpu_kernels.pack_panels`), whose micro-kernel serves every row count, with oneDNN's
blocked layout as the fallback where the C kernels are not built. Same measurement (min-median
of 5): panels 1 row 30-31 ms, 48 rows 100-108 ms, 128 rows 231-248 ms against the row-major C
kernel's 32-34, 128-150 and 338-346 ms and oneDNN's on its blocked copy 49-50, 129-139 and
261-269 ms; at 2,048 rows (prefill chunks) the two are level, 3.4-3.6 s against 3.2-3.6 s. The
copy doubles the weights' memory, so the engine makes it only where that is cheap.
bf16 weights with fp32 activations (a CPU without bf16 arithmetic: `config.activation_dtype`)
take the C kernel, which widens bf16 as it streams it, for every decode batch; prefill chunks
multiply an fp32 copy made per call, which is small next to their GEMMs.

Methods that read the layer's weight (the dense ones) follow any later change to it (training,
pruning); methods that hold a copy (panels, oneDNN's blocked layout) do not: whoever changes the
weight of such a layer chooses its method again. Training needs gradients, which only torch's
ops give: the C kernels step aside for tensors that require them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llmscale.kernels import cpu as cpu_kernels

if TYPE_CHECKING:
    from torch import nn

    from llmscale.model.quant import QuantizedWeight

# ----- the bands ------------------------------------------------------------------------------

# Dense weights without a packed copy. Up to these row counts the row-major C kernels beat
# torch's (at 24 rows 92 ms against 112 ms as `W @ x^T`); for the tall lm_head oneDNN wins
# from 17 rows.
C_KERNEL_MAX_ROWS = {torch.float32: 32, torch.bfloat16: 32}
C_KERNEL_MAX_ROWS_TALL = 16
# bf16 weights with fp32 activations: the alternative is an fp32 copy of the weight per call,
# which costs more than the C kernel up to a decode batch.
MIXED_C_KERNEL_MAX_ROWS = 64
WEIGHT_LEFT_MAX_ROWS = 128
# From this many rows (prefill chunks) oneDNN's fp32 linear beats MKL's GEMM: all decoder
# linears at 128 rows 10.3 ms against 13.8 ms, at 512 rows 31 ms against 42 ms; equal at 2048.
ONEDNN_MIN_ROWS = 96
# ... and from 2 rows for a weight this tall (the lm_head), past the C kernel's rows:
# [48, 576] x [576, 49152] 33 ms against 62 ms as `W @ x^T` (which also transposes the output).
ONEDNN_MIN_OUT_FEATURES = 16384
PREPACK_BATCH_HINT = 256  # oneDNN picks its blocking for this many rows; any count works
# bf16 weights with bf16 activations on a CPU with AVX-512 BF16: pair panels, bf16 in and out,
# beat oneDNN's bf16 GEMM at every row count (BENCHMARKS.md, "Prefill off oneDNN"). The
# row-major C kernel, one pass over the weights, is faster up to BF16_ROW_MAJOR_MAX_ROWS.
BF16_ROW_MAJOR_MAX_ROWS = 3

# Quantized weights. llmscale's C kernels read the weights once per 8 activation rows and are
# compute-bound from ~8 rows: beyond these row counts dequantize + dense GEMM is faster.
INT_C_KERNEL_MAX_ROWS = {8: 24, 4: 16}
# torch's weight-only kernels are memory-bound up to about 8 rows and then cost ~34 us per row of
# a 1536x576 weight, where dequantize + dense GEMM costs ~300 us plus the GEMM: up to 24 rows
# the kernels win, run 8 rows at a time.
INT_KERNEL_MAX_ROWS = 8
INT_KERNEL_MAX_TOTAL_ROWS = 24


def _onednn_linear() -> object | None:
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _add(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def torch_cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] on CPU @ weight^T (+ bias) on torch's ops, by row band: oneDNN for prefill chunks
    (and for the tall lm_head from 2 rows), `W @ x^T` for a few rows, else `F.linear`."""
    if weight.dtype != x.dtype:  # 16-bit weights, fp32 activations: multiply in fp32
        weight = weight.to(x.dtype)
    if _ONEDNN_LINEAR is not None and x.dtype == torch.float32 and not torch.is_grad_enabled():
        onednn_rows = ONEDNN_MIN_ROWS if weight.shape[0] < ONEDNN_MIN_OUT_FEATURES else 2
        if x.shape[0] >= onednn_rows and weight.dtype == torch.float32:
            return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    if 1 < x.shape[0] <= WEIGHT_LEFT_MAX_ROWS:
        return _add(torch.mm(weight, x.t()).t().contiguous(), bias)
    return F.linear(x, weight, bias)


def c_kernel_rows(weight: torch.Tensor, activation_dtype: torch.dtype) -> int:
    """Up to how many rows the row-major C kernel multiplies `weight` (0: never)."""
    if (not cpu_kernels.available() or weight.device.type != "cpu" or weight.shape[1] % 8
            or not weight.is_contiguous() or weight.dtype not in C_KERNEL_MAX_ROWS):
        return 0
    if weight.dtype == torch.bfloat16 and activation_dtype == torch.float32:
        return MIXED_C_KERNEL_MAX_ROWS
    return _tall(weight.shape[0], C_KERNEL_MAX_ROWS[weight.dtype])


def _tall(out_features: int, rows: int) -> int:
    return min(rows, C_KERNEL_MAX_ROWS_TALL) if out_features >= ONEDNN_MIN_OUT_FEATURES else rows


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 c_rows: int) -> torch.Tensor:
    """x [M, K] @ weight^T (+ bias): the row-major C kernel up to `c_rows` rows, torch's beyond."""
    if x.shape[0] <= c_rows and not _needs_grad(x, weight):
        return _add(cpu_kernels.matmul_dense(x.float().contiguous(), weight).to(x.dtype), bias)
    return torch_cpu_linear(x, weight, bias)


# ----- the methods ----------------------------------------------------------------------------

class LinearMethod:
    """How one linear layer computes x [..., K] @ W^T (+ bias). `bias` is the one the layer
    adds in its matmul (None where it adds its own later, after an all-reduce)."""

    fuses_swiglu = False  # apply() returns silu(gate) * up of the gate-up product, [..., N/2]
    holds_copy = False  # holds a packed copy of the weight, which does not follow changes to it

    def __init__(self, layer: nn.Module, bias: torch.Tensor | None) -> None:
        self.layer, self.bias = layer, bias

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.layer.weight, self.bias)


class TorchLinear(LinearMethod):
    """`F.linear` on the layer's weight: any device, differentiable; every layer's method until
    the model's load chooses one."""


class TorchCPULinear(LinearMethod):
    """torch's ops by row band (`torch_cpu_linear`): dense weights on a CPU where the C kernels
    are not built or do not fit the weight."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return F.linear(x, self.layer.weight, self.bias)
        return torch_cpu_linear(x, self.layer.weight, self.bias)


class DenseCLinear(LinearMethod):
    """The row-major C kernel (fp32 or bf16 weights, read as stored) up to `max_rows` rows,
    torch's ops beyond."""

    def __init__(self, layer: nn.Module, bias: torch.Tensor | None, max_rows: int) -> None:
        super().__init__(layer, bias)
        self.max_rows = max_rows

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return F.linear(x, self.layer.weight, self.bias)
        return dense_linear(x, self.layer.weight, self.bias, self.max_rows)


class PanelsLinear(LinearMethod):
    """The C panel micro-kernel on a packed copy of fp32 weights (`cpu_kernels.pack_panels`):
    every row count."""

    holds_copy = True

    def __init__(self, layer: nn.Module, bias: torch.Tensor | None, packed: torch.Tensor) -> None:
        super().__init__(layer, bias)
        self.packed = packed  # [ceil(N / 16), K, 16]
        self.out_features = layer.weight.shape[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return F.linear(x, self.layer.weight, self.bias)
        if _needs_grad(x):
            return torch_cpu_linear(x, self.layer.weight, self.bias)
        y = cpu_kernels.matmul_panels(x.float().contiguous(), self.packed, self.out_features)
        return _add(y.to(x.dtype), self.bias)


class SwigluPanelsLinear(LinearMethod):
    """An MLP's gate-up linear [2 i, K] on panels of 8 gate and 8 up rows
    (`cpu_kernels.pack_swiglu_panels`), whose GEMM yields silu(gate) * up directly, never storing
    the [M, 2 i] product (a 2,048-row chunk: 25 MB written and read back per layer)."""

    fuses_swiglu = True
    holds_copy = True

    def __init__(self, layer: nn.Module, packed: torch.Tensor) -> None:
        super().__init__(layer, None)
        self.packed = packed  # [2 i / 16, K, 16]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and not _needs_grad(x):
            return cpu_kernels.matmul_swiglu_panels(x.float().contiguous(), self.packed).to(x.dtype)
        w = self.layer.weight
        return silu_and_mul(F.linear(x, w) if x.dim() != 2 else torch_cpu_linear(x, w, None))


class PairPanelsLinear(LinearMethod):
    """bf16 weights in pair panels (`cpu_kernels.pack_pair_panels`) for bf16 activations on a
    CPU with AVX-512 BF16: VDPBF16PS on the activations' bf16 pairs as stored, fp32 sums rounded
    to bf16 as they are stored, past `BF16_ROW_MAJOR_MAX_ROWS` rows; the row-major C kernel on the
    stored weight up to it. A gate-up linear's panels (8 gate, 8 up rows) yield silu(gate) * up."""

    holds_copy = True

    def __init__(self, layer: nn.Module, bias: torch.Tensor | None, packed: torch.Tensor,
                 swiglu: bool) -> None:
        super().__init__(layer, bias)
        self.packed = packed  # [N / 16, K / 2, 32]
        self.fuses_swiglu = swiglu
        self.out_features = layer.weight.shape[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        if x.dim() != 2 or _needs_grad(x):
            y = F.linear(x, w, self.bias)
            return silu_and_mul(y) if self.fuses_swiglu else y
        if x.shape[0] <= BF16_ROW_MAJOR_MAX_ROWS:
            y = cpu_kernels.matmul_dense(x.float().contiguous(), w)
            y = cpu_kernels.silu_and_mul(y) if self.fuses_swiglu else y
        else:  # bf16 in and out as stored; anything else through fp32
            xs = x.contiguous() if x.dtype == torch.bfloat16 else x.float().contiguous()
            n, swiglu = self.out_features, self.fuses_swiglu
            y = cpu_kernels.matmul_pair_panels(xs, self.packed, n, swiglu, out_dtype=xs.dtype)
        return _add(y.to(x.dtype), self.bias)


class OneDNNPackedLinear(LinearMethod):
    """oneDNN's linear on a copy of fp32 weights in its blocked layout: every row count where
    the C kernels are not built (torch's ops where gradients are wanted)."""

    holds_copy = True

    def __init__(self, layer: nn.Module, bias: torch.Tensor | None, packed: torch.Tensor) -> None:
        super().__init__(layer, bias)
        self.packed = packed

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return F.linear(x, self.layer.weight, self.bias)
        if x.dtype == torch.float32 and not torch.is_grad_enabled():
            return _ONEDNN_LINEAR(x, self.packed, self.bias, "none", [], "")
        return torch_cpu_linear(x, self.layer.weight, self.bias)


class QuantizedLinear(LinearMethod):
    """Weight-only int8/int4: dequantize (in cache-sized chunks) and multiply densely, the
    chunks through `dense_linear` with the C kernel up to `dense_c_rows` rows. The method of
    quantized weights off the CPU, and the band past the kernels' rows of the two below."""

    def __init__(self, layer: nn.Module, bias: torch.Tensor | None, quant: QuantizedWeight,
                 dense_c_rows: int) -> None:
        super().__init__(layer, bias)
        self.quant, self.dense_c_rows = quant, dense_c_rows

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)  # [M, N]
        return _add(y, self.bias)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.quant.dequantized_matmul(x, F.linear)
        return self.quant.dequantized_matmul(
            x, lambda a, w: dense_linear(a, w, None, _tall(w.shape[0], self.dense_c_rows)))


class QuantizedCLinear(QuantizedLinear):
    """llmscale's C kernels (int8 activations per 32 values, integer dot products) up to
    `INT_C_KERNEL_MAX_ROWS` rows."""

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= INT_C_KERNEL_MAX_ROWS[self.quant.bits]:
            return self.quant.c_matmul(x)
        return super()._matmul(x)


class QuantizedTorchLinear(QuantizedLinear):
    """torch's weight-only kernels (bf16 activations), 8 rows at a time up to 24, where the C
    kernels are not built."""

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if m <= INT_KERNEL_MAX_ROWS:
            # bf16 keeps 8 mantissa bits; for few rows the rounding residual goes in as a second
            # bf16 row and restores 16.
            residual = x.dtype == torch.float32 and 2 * m <= INT_KERNEL_MAX_ROWS
            return self.quant.kernel_matmul(x, residual)
        if m <= INT_KERNEL_MAX_TOTAL_ROWS:
            return torch.cat([self._matmul(part) for part in x.split(INT_KERNEL_MAX_ROWS)])
        return super()._matmul(x)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 i] gate then up -> silu(gate) * up [..., i]."""
    if gate_up.dim() == 2 and cpu_kernels.usable(gate_up) and gate_up.shape[1] % 16 == 0:
        return cpu_kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----- the choice -----------------------------------------------------------------------------

def choose_method(layer: nn.Module, activation_dtype: torch.dtype, prepack: bool = False) -> LinearMethod:
    """The method of a loaded (Column|Row)ParallelLinear or VocabEmbedding's projection.
    `prepack`: copy fp32 weights into a GEMM's packed layout (the engine's choice, where memory
    allows), and bf16 ones into pair panels where bf16 activations meet AVX-512 BF16; a gate-up
    linear (`layer.feeds_swiglu`) gets the SwiGLU-fused panels."""
    bias = layer.matmul_bias
    quant = layer.quant
    if quant is not None:
        return quantized_method(quant, activation_dtype, layer, bias)
    w = layer.weight
    if w.device.type != "cpu":
        return TorchLinear(layer, bias)
    c_kernels = cpu_kernels.available()
    if prepack and w.dtype == torch.float32:
        if c_kernels and layer.feeds_swiglu and bias is None and w.shape[0] % 16 == 0:
            return SwigluPanelsLinear(layer, cpu_kernels.pack_swiglu_panels(w))
        if c_kernels:
            return PanelsLinear(layer, bias, cpu_kernels.pack_panels(w))
        if _ONEDNN_LINEAR is not None:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PREPACK_BATCH_HINT)
            return OneDNNPackedLinear(layer, bias, packed)
    if prepack and activation_dtype == torch.bfloat16 and cpu_kernels.fits_pair_panels(w):
        swiglu = layer.feeds_swiglu and bias is None
        panels = cpu_kernels.pack_swiglu_panels(w) if swiglu else cpu_kernels.pack_panels(w)
        return PairPanelsLinear(layer, bias, cpu_kernels.pack_pair_panels(panels), swiglu)
    rows = c_kernel_rows(w, activation_dtype)
    return DenseCLinear(layer, bias, rows) if rows else TorchCPULinear(layer, bias)


def quantized_method(quant: QuantizedWeight, activation_dtype: torch.dtype,
                     layer: nn.Module | None = None, bias: torch.Tensor | None = None) -> QuantizedLinear:
    """The method of a prepared `QuantizedWeight` (its `prepare` built the C kernels' operands or
    torch's packed ones, or none off the CPU)."""
    # The dequantized chunks are contiguous [rows, K] in the activations' dtype.
    cpu = quant.qweight.device.type == "cpu" and cpu_kernels.available() and quant.in_features % 8 == 0
    dense_rows = C_KERNEL_MAX_ROWS.get(activation_dtype, 0) if cpu else 0
    if quant.c_scales is not None:
        return QuantizedCLinear(layer, bias, quant, dense_rows)
    if quant.kernel_weight is not None:
        return QuantizedTorchLinear(layer, bias, quant, dense_rows)
    return QuantizedLinear(layer, bias, quant, dense_rows)
