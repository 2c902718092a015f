"""A GGUF's quantized linears kept quantized (`--keep-quantized`): an int8/int4 checkpoint.

Q4_0 and Q4_1 blocks (32 weights: fp16 scale d, for Q4_1 an fp16 minimum m, 16 bytes of
nibbles, element j in the low nibble of byte j and element j + 16 in the high one) are exactly
our int4 format with group size 32: Q4_1 is w = q*d + m = (q - 8)*d + (m + 8d), Q4_0 is
w = (q - 8)*d. Codes and d are kept as they are; only m + 8d is rounded to fp16. Q8_0 has a
scale per 32 weights where our int8 kernel takes one per row, so Q8_0 linears are
requantized per row (error below a Q8_0 step).
Embeddings and the lm_head are int8 per row; norms stay fp32. Linears in any other type (a
mixed file's odd tensor) are requantized from their dequantized values, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import save_file

from llmscale.config import ConfigError, QuantConfig
from llmscale.model.gguf_loader import TensorInfo, dequantize, unpermute_rope
from llmscale.model.llama import EMBEDDING_NAMES, is_linear_weight
from llmscale.model.quant import pack_nibbles, quantize_int4, quantize_int8

log = logging.getLogger(__name__)

Q4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
GGUF_GROUP = 32


def q4_blocks(raw: np.ndarray, info: TensorInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0/Q4_1 bytes -> (codes uint8 [N, K], scales fp32 [N, K/32], zeros fp32 [N, K/32])."""
    n, k = info.shape
    block = 20 if info.qtype == GGMLQuantizationType.Q4_1 else 18
    blocks = raw.reshape(n, k // GGUF_GROUP, block)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., block - 16:]
    codes = np.concatenate((qs & 0xF, qs >> 4), axis=-1).reshape(n, k)
    if info.qtype == GGMLQuantizationType.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zeros = m + 8 * d
    else:
        zeros = np.zeros_like(d)
    return codes, d, zeros


def _linear_bits(plan: list[tuple[TensorInfo, int | None]], names: list[str], path: Path) -> int:
    types = {info.qtype for (info, _), name in zip(plan, names, strict=True) if is_linear_weight(name)}
    if types & set(Q4_TYPES):
        return 4
    if types == {GGMLQuantizationType.Q8_0}:
        return 8
    raise ConfigError(f"--keep-quantized serves Q8_0, Q4_0 and Q4_1 weights; {path.name} holds "
                      f"{', '.join(sorted(t.name for t in types))} (drop the flag to dequantize it)")


def write_quantized(out: Path, gguf_path: Path, names: list[str],
                    plan: list[tuple[TensorInfo, int | None]], src: BinaryIO) -> QuantConfig:
    """Write the checkpoint's tensors to `out` (safetensors); returns its quantization config."""
    bits = _linear_bits(plan, names, gguf_path)
    cfg = QuantConfig(bits=bits, group_size=GGUF_GROUP if bits == 4 else 0, embedding_bits=8)
    tensors: dict[str, torch.Tensor] = {}
    for name, (info, n_head) in zip(names, plan, strict=True):
        src.seek(info.offset)
        raw = np.frombuffer(src.read(info.nbytes), dtype=np.uint8)
        if raw.size != info.nbytes:
            raise ConfigError(f"{gguf_path} is truncated inside tensor {info.name}")

        def rows(a: np.ndarray, n_head: int | None = n_head) -> torch.Tensor:
            return torch.from_numpy(np.array(a if n_head is None else unpermute_rope(a, n_head)))

        prefix = name.removesuffix(".weight")
        if is_linear_weight(name) and bits == 4 and info.qtype in Q4_TYPES:
            codes, scales, zeros = (rows(a) for a in q4_blocks(raw, info))
        elif is_linear_weight(name) and bits == 4:
            log.warning("%s: %s is %s, requantized to int4", gguf_path.name, info.name, info.qtype.name)
            codes, scales, zeros = quantize_int4(rows(dequantize(raw, info)), GGUF_GROUP)
        elif is_linear_weight(name) or name in EMBEDDING_NAMES:
            q, scales = quantize_int8(rows(dequantize(raw, info)))
            tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scales"] = q, scales.half()
            continue
        else:
            tensors[name] = rows(dequantize(raw, info))
            continue
        tensors[f"{prefix}.qweight"] = pack_nibbles(codes)
        tensors[f"{prefix}.scales"], tensors[f"{prefix}.zeros"] = scales.half(), zeros.half()
    save_file(tensors, str(out), metadata={"format": "pt"})
    return cfg
