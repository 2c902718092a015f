"""Attention over the paged KV cache.

The cache of one layer is two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`.
A step's flat batch puts single-token queries (decodes) first and multi-token chunks
(prefills) after them; `AttentionMetadata` describes both parts.

With llmscale's C kernels on CPU, decodes read the paged cache (fp32 or bf16) in place, each
sequence over its own context only; with fp32 activations prefill chunks also run a causal
attention kernel on the GEMM micro-kernel (`kernels/cpu.c`), widening a bf16 cache's tokens.
Otherwise decodes run as one batched SDPA call: their blocks are gathered into a padded
`[B, Hkv, L, D]` view and the query heads of each KV group are folded into the query-length
axis (`[B, Hkv, G, D]`), which is exact for one query position and avoids repeating K/V for
GQA. Prefill chunks run one SDPA call each: a chunk with no earlier context attends to its own
fresh K/V with `is_causal`; a chunk after cached or earlier-chunk context gathers its blocks
and uses a bottom-right-aligned causal mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from llmscale.kernels import cpu as cpu_kernels


class SplitAttention(Protocol):
    """A prefill chunk split over context-parallel ranks (`parallel/context.py`'s `RingChunk`):
    this rank's part attends to every part through the other ranks."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, block_table: torch.Tensor, scale: float,
               gather: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]) -> torch.Tensor: ...


@dataclass
class PrefillChunk:
    query_start: int  # offset of this chunk's tokens in the flat batch
    query_len: int
    context_len: int  # tokens in the cache after this step, including the chunk
    block_table: torch.Tensor  # [num_blocks_needed] long
    split: SplitAttention | None = None  # this rank's part of a chunk split over ranks


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot of each new token
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] long, padded with 0
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size], 0 or -inf
    # With `c_kernels` (on CPU where llmscale's C kernels run), rotary and the cache write are
    # one C call and prefills run the C attention kernel, both in fp32 (bf16 activations widen).
    c_kernels: bool = False
    # ... and with `attention_bf16_dots` (bf16 activations, AVX-512 BF16), prefill attention's
    # products take bf16 values, as torch's bf16 attention does (`cpu_kernels.prefill_attention`).
    attention_bf16_dots: bool = False
    # With `decode_in_place` (an fp32 or bf16 cache on CPU where the C kernels run), decodes
    # read the paged cache in place given their context lengths instead of a gather and a mask.
    decode_in_place: bool = False
    decode_context_lens: torch.Tensor | None = None  # [B] long
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Gather buffers owned by the model runner, reused across layers and steps: on CPU a fresh
    # multi-MB tensor costs more in page faults than the copy into it. Per runner, so two
    # engines on two threads never share one.
    workspaces: dict[str, torch.Tensor] = field(default_factory=dict)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, Hkv, D]) into their cache slots."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _workspace(workspaces: dict[str, torch.Tensor], name: str, numel: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    buf = workspaces.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        size = max(numel, 2 * buf.numel() if buf is not None else 0)
        buf = workspaces[name] = torch.empty(size, dtype=dtype, device=device)
    return buf[:numel]


def _gather_tokens(cache: torch.Tensor, block_table: torch.Tensor, workspaces: dict[str, torch.Tensor],
                   name: str) -> torch.Tensor:
    """[..., nb] block ids -> [..., nb * block_size, Hkv, D], copied into a reused workspace."""
    _, bs, hkv, d = cache.shape
    ids = block_table.reshape(-1)
    out = _workspace(workspaces, name, ids.numel() * bs * hkv * d, cache.dtype, cache.device)
    torch.index_select(cache.view(cache.shape[0], -1), 0, ids, out=out.view(ids.numel(), -1))
    return out.view(*block_table.shape[:-1], block_table.shape[-1] * bs, hkv, d)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, workspaces: dict[str, torch.Tensor],
            name: str) -> torch.Tensor:
    """[..., nb] block ids -> [..., Hkv, nb * block_size, D] (a strided view of one copy)."""
    return _gather_tokens(cache, block_table, workspaces, name).transpose(-3, -2)


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, Hkv, D] for this step's tokens (already written to the cache).

    Returns [T, Hq, D].
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd and meta.decode_in_place:
        out[:nd] = cpu_kernels.paged_decode_attention(
            q[:nd].float().contiguous(), k_cache, v_cache, meta.decode_block_tables,
            meta.decode_context_lens, scale)
    elif nd:
        kd = _gather(k_cache, meta.decode_block_tables, meta.workspaces, "k")  # [B, Hkv, L, D]
        vd = _gather(v_cache, meta.decode_block_tables, meta.workspaces, "v")
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim).to(kd.dtype)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = od.reshape(nd, num_heads, head_dim).to(q.dtype)
    for chunk in meta.prefills:
        s, n = chunk.query_start, chunk.query_len
        if chunk.split is not None:
            out[s:s + n] = chunk.split.attend(
                q[s:s + n], k[s:s + n], v[s:s + n], k_cache, v_cache, chunk.block_table, scale,
                lambda cache, table, name: _gather_tokens(cache, table, meta.workspaces, name))
            continue
        if meta.c_kernels:  # the C kernel reads K/V token-major, as they are in the batch and cache
            # It reads fp32 (bf16 activations and a bf16 cache's tokens widen as they go in), or
            # with bf16 products, bf16 too.
            as_read = _as_is if meta.attention_bf16_dots else torch.Tensor.float
            if chunk.context_len == n:
                kc, vc = as_read(k[s:s + n]), as_read(v[s:s + n])
            else:
                length = chunk.context_len
                kc = as_read(_gather_tokens(k_cache, chunk.block_table, meta.workspaces, "k")[:length])
                vc = as_read(_gather_tokens(v_cache, chunk.block_table, meta.workspaces, "v")[:length])
            size = cpu_kernels.prefill_attention_workspace(kc.shape[0], num_kv_heads, head_dim)
            work = _workspace(meta.workspaces, "prefill_attention", size, torch.float32, q.device)
            out[s:s + n] = cpu_kernels.prefill_attention(q[s:s + n].float(), kc, vc, scale, work,
                                                         meta.attention_bf16_dots)
            continue
        qc = q[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if chunk.context_len == n:
            kc = k[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
            vc = v[s:s + n].transpose(0, 1).unsqueeze(0)
            oc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        else:
            length = chunk.context_len
            kc = _gather(k_cache, chunk.block_table, meta.workspaces, "k")[:, :length]
            kc = kc.unsqueeze(0).to(q.dtype)
            vc = _gather(v_cache, chunk.block_table, meta.workspaces, "v")[:, :length]
            vc = vc.unsqueeze(0).to(q.dtype)
            # Query i sits at absolute position length - n + i and sees keys up to there.
            qpos = torch.arange(length - n, length, device=q.device).unsqueeze(1)
            mask = torch.arange(length, device=q.device).unsqueeze(0) <= qpos  # [n, L]
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s:s + n] = oc.squeeze(0).transpose(0, 1)
    return out
