"""`x @ W^T` for a dense linear layer, with the kernel that is fast for its shape.

Decode steps multiply a few activation rows by every weight, so they are bound by streaming
the weights from memory. On CPU, torch's kernels for those shapes fall short of that
(measured on a 2-core AVX2 CPU, torch 2.13, all decoder linears of SmolLM2-135M in fp32:
1 row 56 ms as `torch.mm`, single-threaded GEMV; 8 rows 78 ms), so up to a few rows the C
kernels of `llmscale.kernels` run instead (29 ms and 48 ms; bf16 weights 19 ms and 38 ms);
they win up to ~32 rows.
Without them, `W @ x^T` beats `F.linear` for 2-128 rows (a [8, 576] x [576, 3072] product
1.4 ms against 2.7 ms: the short operand on the left makes torch repack the weight per call).
Prefill chunks are compute-bound, where oneDNN's linear is the fastest of torch's here.
Faster still is a GEMM on a copy of the weight packed for it (`prepack`): the C kernels' own
panel layout (`cpu_kernels.pack_panels`), whose micro-kernel serves every row count, with
oneDNN's blocked layout as the fallback where the C kernels are not built. Same measurement
(min-median of 5): panels 1 row 30-31 ms, 48 rows 100-108 ms, 128 rows 231-248 ms against
the row-major C kernel's 32-34, 128-150 and 338-346 ms and oneDNN's on its blocked copy
49-50, 129-139 and 261-269 ms; at 2,048 rows (prefill chunks) the two are level, 3.4-3.6 s
against 3.2-3.6 s. The copy doubles the weights' memory, so the engine makes it only where
that is cheap.
bf16 weights with fp32 activations (a CPU without bf16 arithmetic: `config.activation_dtype`)
take the C kernel, which widens bf16 as it streams it, for every decode batch; prefill chunks
multiply an fp32 copy made per call, which is small next to their GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmscale.kernels import cpu as cpu_kernels

WEIGHT_LEFT_MAX_ROWS = 128
# From this many rows (prefill chunks) oneDNN's fp32 linear beats MKL's GEMM: all decoder
# linears at 128 rows 10.3 ms against 13.8 ms, at 512 rows 31 ms against 42 ms; equal at 2048.
ONEDNN_MIN_ROWS = 96
# ... and from 2 rows for a weight this tall (the lm_head), past the C kernel's rows:
# [48, 576] x [576, 49152] 33 ms against 62 ms as `W @ x^T` (which also transposes the output).
ONEDNN_MIN_OUT_FEATURES = 16384


def _onednn_linear() -> object | None:
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()
# Up to these row counts the C kernels beat torch's (same measurement as above: at 24 rows
# 92 ms against 112 ms as `W @ x^T`); for the tall lm_head oneDNN wins from 17 rows.
C_KERNEL_MAX_ROWS = {torch.float32: 32, torch.bfloat16: 32}
C_KERNEL_MAX_ROWS_TALL = 16
# bf16 weights with fp32 activations (config.activation_dtype): the alternative is an fp32
# copy of the weight per call, which costs more than the C kernel up to a decode batch.
MIXED_C_KERNEL_MAX_ROWS = 64
PREPACK_BATCH_HINT = 256  # oneDNN picks its blocking for this many rows; any count works


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """A copy of a CPU fp32 weight [out, in] laid out for a faster GEMM: the C kernels'
    panels, else oneDNN's blocked layout; None where neither applies."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    if cpu_kernels.available():
        return cpu_kernels.pack_panels(weight)
    if _ONEDNN_LINEAR is None:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PREPACK_BATCH_HINT)


def prepack_swiglu(gate_up: torch.Tensor) -> torch.Tensor | None:
    """For a gate-up weight [2 i, k] (gate rows, then up rows): the C kernels' panels whose GEMM
    yields silu(gate) * up directly (`cpu_kernels.matmul_swiglu_panels`), never storing the
    [m, 2 i] product (a 2,048-row chunk: 25 MB written and read back per layer); None where
    it does not apply."""
    if (gate_up.dtype != torch.float32 or gate_up.device.type != "cpu" or gate_up.shape[0] % 16
            or not cpu_kernels.available()):
        return None
    return cpu_kernels.pack_swiglu_panels(gate_up)


def _c_kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = C_KERNEL_MAX_ROWS.get(weight.dtype, 0)
    if weight.dtype == torch.bfloat16 and x.dtype == torch.float32:
        rows = MIXED_C_KERNEL_MAX_ROWS
    elif weight.shape[0] >= ONEDNN_MIN_OUT_FEATURES:
        rows = min(rows, C_KERNEL_MAX_ROWS_TALL)
    return (x.shape[0] <= rows and weight.shape[1] % 8 == 0
            and weight.is_contiguous() and cpu_kernels.available()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """`packed`: `prepack(weight)`, kept by the caller, which must renew it if `weight` changes;
    panels serve every row count, oneDNN's copy every count past the C kernel's."""
    if (packed is not None and cpu_kernels.is_panels(packed) and x.dim() == 2
            and not (torch.is_grad_enabled() and x.requires_grad)):
        y = cpu_kernels.matmul_panels(x.float().contiguous(), packed, weight.shape[0]).to(x.dtype)
        return y if bias is None else y + bias
    if x.device.type == "cpu" and x.dim() == 2 and _c_kernel_fits(x, weight):
        y = cpu_kernels.matmul_dense(x.float().contiguous(), weight).to(x.dtype)
        return y if bias is None else y + bias
    if weight.dtype != x.dtype:  # 16-bit weights, fp32 activations: multiply in fp32
        weight = weight.to(x.dtype)
    if x.device.type == "cpu" and x.dim() == 2:
        if _ONEDNN_LINEAR is not None and x.dtype == torch.float32 and not torch.is_grad_enabled():
            if packed is not None:
                return _ONEDNN_LINEAR(x, packed, bias, "none", [], "")
            onednn_rows = ONEDNN_MIN_ROWS if weight.shape[0] < ONEDNN_MIN_OUT_FEATURES else 2
            if x.shape[0] >= onednn_rows and weight.dtype == torch.float32:
                return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
        if 1 < x.shape[0] <= WEIGHT_LEFT_MAX_ROWS:
            y = torch.mm(weight, x.t()).t().contiguous()
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)
