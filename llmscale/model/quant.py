"""Weight-only int8 / int4 quantization: the checkpoint format, the math, and the matmuls.

Formats (what a quantized checkpoint stores per linear, under the HF tensor name's prefix):
  int8  `qweight` int8 [N, K] and `scales` [N]: symmetric per output channel, w = q * s.
  int4  `qweight` uint8 [N, K/2] (two codes per byte, low nibble first), `scales` and
        `zeros` [N, K/g]: asymmetric per group of g inputs, w = (q - 8) * s + z with q in
        [0, 15]. This is the affine form torch's int4 CPU kernel computes, and GGUF Q4_0/Q4_1
        blocks map onto it (Q4_1: s = d, z = m + 8d; Q4_0: s = d, z = 0).
Scales and zeros are stored in fp16 (GGUF's own precision for d and m): in fp32 they would
add a fifth to an int4 checkpoint at group size 32.
The checkpoint keeps the portable layout; the kernel layout (torch's int4 pack) is built at
load time, since it is specific to the device and torch version.

The kernels on CPU (which one runs for how many rows is the layer's `LinearMethod`, chosen at
load time: `llmscale.model.linear_method`): llmscale's C kernels (`llmscale.kernels`: int8
activations per 32 values, integer dot products), reading a quarter or an eighth of the fp32
bytes; where those cannot build, torch's weight-only kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) with bf16 activations (their fp32-activation paths are reference
loops); for many rows (compute-bound) the weight dequantized (by the C kernels where they build)
chunk by chunk into a reused buffer that stays in cache, then multiplied densely.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmscale.kernels import cpu as cpu_kernels

INT4_MID = 8
# Dequantize at most this many weights at a time: an fp32 chunk of 8 MiB stays in cache.
DEQUANT_CHUNK = 2 * 1024 * 1024


# ----- the math --------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], fp32 scales [N]), symmetric per row."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(dtype) * scale.to(dtype)[:, None])


def quantize_int4(w: torch.Tensor, group_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (codes uint8 [N, K] in [0, 15], scales [N, G], zeros [N, G]), min-max
    affine per group, so each group's min and max are represented exactly."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = lo + INT4_MID * scale
    return codes.to(torch.uint8).reshape(n, k), scale, zero


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    n, k = codes.shape
    groups = scale.shape[1]
    w = out if out is not None else torch.empty(n, k, dtype=dtype, device=codes.device)
    g = w.view(n, groups, k // groups)
    g.copy_(codes.view(n, groups, -1)).sub_(INT4_MID)
    return w.view(n, groups, -1).mul_(scale.to(dtype)[..., None]).add_(zero.to(dtype)[..., None]).view(n, k)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in [0, 15] -> uint8 [N, K/2], element 2j in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


# ----- modules ---------------------------------------------------------------------------------

class Workspace:
    """One growable scratch buffer per model, shared by its quantized layers (they run one at
    a time): a fresh multi-MB tensor per matmul would cost more in page faults than the math."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[dtype] = buf
        return buf[:numel]


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class QuantizedWeight(nn.Module):
    """The quantized weight of one linear ([N, K]) and its kernels for `x @ W^T`."""

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int = 0) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bits, self.group_size = bits, group_size
        if bits == 8:
            self.qweight = _param(out_features, in_features, dtype=torch.int8)
            self.scales = _param(out_features, dtype=torch.float32)
        else:
            self.qweight = _param(out_features, in_features // 2, dtype=torch.uint8)
            self.scales = _param(out_features, in_features // group_size, dtype=torch.float32)
            self.zeros = _param(out_features, in_features // group_size, dtype=torch.float32)
        self.workspace = Workspace()  # replaced by the model's shared one
        # Built by prepare(): operands of llmscale's C kernels, or of torch's packed kernels.
        self.c_scales: torch.Tensor | None = None
        self.c_zeros: torch.Tensor | None = None
        self.kernel_weight: torch.Tensor | None = None
        self.kernel_scales: torch.Tensor | None = None

    def prepare(self, c_kernels: bool | None = None) -> None:
        """Build the kernel operands once the checkpoint is loaded. `c_kernels` (default: when
        they build here) picks llmscale's C kernels over torch's packed ones."""
        if self.qweight.device.type != "cpu":
            return
        if c_kernels is None:
            c_kernels = cpu_kernels.available()
        if c_kernels and self.in_features % cpu_kernels.QBLOCK == 0 and (
                self.bits == 8 or self.group_size % cpu_kernels.QBLOCK == 0):
            self.c_scales = self.scales.data.float().contiguous()
            if self.bits == 4:
                self.c_zeros = self.zeros.data.float().contiguous()
            return
        if self.bits == 8:
            self.kernel_weight = self.qweight.data
            self.kernel_scales = self.scales.data.to(torch.bfloat16)
        else:
            codes = unpack_nibbles(self.qweight.data).to(torch.int32)
            self.kernel_weight = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            self.kernel_scales = torch.stack((self.scales.data.t(), self.zeros.data.t()), dim=-1
                                             ).to(torch.bfloat16).contiguous()

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, end) of the weight in `dtype`."""
        if self.c_scales is not None and out is not None and dtype == torch.float32:
            if self.bits == 8:
                return cpu_kernels.dequant_int8(self.qweight[start:end], self.c_scales[start:end], out)
            return cpu_kernels.dequant_int4(self.qweight[start:end], self.c_scales[start:end],
                                            self.c_zeros[start:end], self.group_size, out)
        if self.bits == 8:
            q = self.qweight[start:end]
            if out is None:
                return dequantize_int8(q, self.scales[start:end], dtype)
            return torch.mul(q, self.scales[start:end, None].to(dtype), out=out)
        codes = unpack_nibbles(self.qweight[start:end])
        return dequantize_int4(codes, self.scales[start:end], self.zeros[start:end], dtype, out)

    def c_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] by llmscale's C kernels (after `prepare` chose them)."""
        xf = x.float().contiguous()
        if self.bits == 8:
            y = cpu_kernels.matmul_int8(xf, self.qweight, self.c_scales)
        else:
            y = cpu_kernels.matmul_int4(xf, self.qweight, self.c_scales, self.c_zeros, self.group_size)
        return y.to(x.dtype)

    def kernel_matmul(self, x: torch.Tensor, residual: bool) -> torch.Tensor:
        """x [M, K] -> [M, N] by torch's weight-only kernels (after `prepare` chose them), in
        bf16; `residual`: the fp32 activations' rounding residual as extra bf16 rows, which
        restores 16 mantissa bits (for a few rows of a memory-bound kernel)."""
        m = x.shape[0]
        xb = x.to(torch.bfloat16)
        if residual:
            xb = torch.cat((xb, (x - xb.float()).to(torch.bfloat16)))
        if self.bits == 8:
            y = torch._weight_int8pack_mm(xb, self.kernel_weight, self.kernel_scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, self.kernel_weight, self.group_size, self.kernel_scales)
        y = y.to(x.dtype)
        return y[:m] + y[m:] if y.shape[0] > m else y

    def dequant_chunk_rows(self) -> int:
        """How many rows `dequantized_matmul` dequantizes at a time."""
        return max(1, min(self.out_features, DEQUANT_CHUNK // self.in_features))

    def dequantized_matmul(self, x: torch.Tensor,
                           dense: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x [M, K] -> [M, N]: the weight dequantized to x's dtype a cache-sized chunk at a
        time into the shared workspace, each chunk multiplied by `dense(x, w)`."""
        n, k = self.out_features, self.in_features
        rows = self.dequant_chunk_rows()
        if rows >= n:
            buf = self.workspace.get(n * k, x.dtype, x.device).view(n, k)
            return dense(x, self.dequantize_rows(0, n, x.dtype, buf))
        y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        buf = self.workspace.get(rows * k, x.dtype, x.device)
        for start in range(0, n, rows):
            end = min(n, start + rows)
            w = self.dequantize_rows(start, end, x.dtype, buf[:(end - start) * k].view(end - start, k))
            y[:, start:end] = dense(x, w)
        return y

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight (an embedding lookup), dequantized."""
        if self.bits == 8:
            return F.embedding(ids, self.qweight).to(dtype) * self.scales[ids].to(dtype)[:, None]
        codes = unpack_nibbles(F.embedding(ids, self.qweight))
        return dequantize_int4(codes, self.scales[ids], self.zeros[ids], dtype)
