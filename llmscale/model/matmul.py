"""`x @ W^T` for a linear layer, with the operand order that is fast for its shape.

On CPU, torch's GEMM for a few rows against a weight ([M, K] x [K, N], M small) runs 1.3-3x
faster when written as `W @ x^T` (measured on a 2-core AVX2 CPU, torch 2.13: a [8, 576] x
[576, 3072] product 2.7 ms as `F.linear`, 1.4 ms as `W @ x^T`; equal at one row; `F.linear`
wins again from ~256 rows). Decode steps are exactly this shape, once per linear per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_LEFT_MAX_ROWS = 128


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.device.type == "cpu" and x.dim() == 2 and 1 < x.shape[0] <= WEIGHT_LEFT_MAX_ROWS:
        y = torch.mm(weight, x.t()).t().contiguous()
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)
