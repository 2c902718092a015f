"""`x @ W^T` for a dense linear layer, with the kernel that is fast for its shape.

Decode steps multiply a few activation rows by every weight, so they are bound by streaming
the weights from memory. On CPU, torch's kernels for those shapes fall short of that
(measured on a 2-core AVX2 CPU, torch 2.13, all decoder linears of SmolLM2-135M in fp32:
1 row 56 ms as `torch.mm`, single-threaded GEMV; 8 rows 78 ms), so up to a few rows the C
kernels of `llmscale.kernels` run instead (29 ms and 48 ms; bf16 weights 19 ms and 38 ms).
Without them, `W @ x^T` beats `F.linear` for 2-128 rows (a [8, 576] x [576, 3072] product
1.4 ms against 2.7 ms: the short operand on the left makes torch repack the weight per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmscale.kernels import cpu as cpu_kernels

WEIGHT_LEFT_MAX_ROWS = 128
# Up to these row counts the C kernels beat torch's (same measurement as above).
C_KERNEL_MAX_ROWS = {torch.float32: 12, torch.bfloat16: 32}


def _c_kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.shape[0] <= C_KERNEL_MAX_ROWS.get(weight.dtype, 0) and weight.shape[1] % 8 == 0
            and weight.is_contiguous() and cpu_kernels.available()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.device.type == "cpu" and x.dim() == 2:
        if _c_kernel_fits(x, weight):
            y = cpu_kernels.matmul_dense(x.float().contiguous(), weight).to(x.dtype)
            return y if bias is None else y + bias
        if 1 < x.shape[0] <= WEIGHT_LEFT_MAX_ROWS:
            y = torch.mm(weight, x.t()).t().contiguous()
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)
