"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3) over a flat token batch.

All sequences of a step are concatenated into one `[T]` token list: the linears see one
`[T, hidden]` matrix, only attention looks at sequence boundaries (via `AttentionMetadata`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from llmscale.config import ModelConfig, stage_layers
from llmscale.kernels import cpu as cpu_kernels
from llmscale.model.attention import AttentionMetadata, paged_attention, write_kv
from llmscale.model.layers import (
    ColumnParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabEmbedding,
)
from llmscale.model.linear_method import silu_and_mul
from llmscale.model.quant import QuantizedWeight, Workspace

if TYPE_CHECKING:
    from llmscale.model.loader import LayerLoad

# HF checkpoint names of the linears inside decoder layers, and of the embedding matrices.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def is_linear_weight(name: str) -> bool:
    """Whether an HF checkpoint tensor is the weight of a decoder-layer linear."""
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR_NAMES


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads // tp_size
        self.num_kv_heads = max(1, cfg.num_key_value_heads // tp_size)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        quant = cfg.quantization
        # Fewer KV heads than ranks: each KV head is replicated on the ranks whose query heads use it.
        kv_parts = min(cfg.num_key_value_heads, tp_size)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [q, kv, kv], cfg.attention_bias,
                                             tp_rank, tp_size, quant, shards=[tp_size, kv_parts, kv_parts])
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, False, tp_rank, tp_size, quant)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        # Set by the model runner once the cache is allocated.
        self.k_cache: torch.Tensor = torch.empty(0)
        self.v_cache: torch.Tensor = torch.empty(0)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t, nq, nkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        v = qkv[:, (nq + nkv) * d:].view(t, nkv, d)  # [T, Hkv, D]
        if meta.c_kernels and self.q_norm is None:  # rotary and the cache write in one C call, fp32 inside
            q, k = cpu_kernels.rope_and_cache(qkv, nq, nkv, self.rotary.cos, self.rotary.sin,
                                              positions, meta.slot_mapping, self.k_cache, self.v_cache)
        else:
            qk = qkv[:, :(nq + nkv) * d].view(t, nq + nkv, d)  # q heads then k heads
            if self.q_norm is not None:
                qk = torch.cat((self.q_norm(qk[:, :nq]), self.k_norm(qk[:, nq:])), dim=1)
            qk = self.rotary.rotate(positions, qk)  # q and k in one pass
            q, k = qk[:, :nq], qk[:, nq:]  # [T, Hq, D], [T, Hkv, D]
            write_kv(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        quant = cfg.quantization
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [inter, inter], False, tp_rank, tp_size,
                                                 quant, feeds_swiglu=True)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, False, tp_rank, tp_size, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if not self.gate_up_proj.method.fuses_swiglu:  # else its GEMM yielded the activation
            h = silu_and_mul(h)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp_rank, tp_size)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it): the next norm adds
        them, fused with its own work, as vLLM's layers do."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our packed module fragment, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_position: int, tp_rank: int = 0, tp_size: int = 1,
                 stage: int = 0, stages: int = 1) -> None:
        """Pipeline stage `stage` of `stages` holds its range of the layers (`stage_layers`),
        the first the embedding, the last the final norm and the lm_head."""
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        embed_bits = cfg.quantization.embedding_bits if cfg.quantization else 0
        self.tp_size = tp_size
        self.is_first_stage, self.is_last_stage = stage == 0, stage == stages - 1
        self.layer_range = stage_layers(cfg.num_hidden_layers, stage, stages)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, embed_bits, tp_rank, tp_size
                                           ) if self.is_first_stage else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, tp_rank, tp_size) for _ in self.layer_range)
        self.norm = self.lm_head = None
        if self.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            tied = cfg.tie_word_embeddings and self.embed_tokens is not None
            self.lm_head = self.embed_tokens if tied else VocabEmbedding(
                cfg.vocab_size, cfg.hidden_size, embed_bits, tp_rank, tp_size)
        # While the decoder layers' weights stream in (loader.LayerLoad.start): what forward waits on.
        self.pending_layers: LayerLoad | None = None
        # One dequantize buffer for all quantized layers: they run one after another.
        self.workspace = Workspace()
        for module in self.modules():
            if isinstance(module, QuantizedWeight):
                module.workspace = self.workspace

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> [T, hidden]: the final hidden states on the last stage,
        else the residual stream after this stage's layers (`hidden`, what the next stage takes
        instead of embedding the ids)."""
        x = self.embed_tokens(input_ids).to(self.activation_dtype) if hidden is None else hidden
        residual = None
        pending = self.pending_layers
        for i, layer in enumerate(self.layers):
            if pending is not None:
                pending.wait(i)
            x, residual = layer(positions, x, residual, meta)
        if pending is not None and pending.done:
            self.pending_layers = None
        if self.norm is None:
            return x + residual  # what the next stage's first norm would add
        return self.norm.add_forward(x, residual)[0] if residual is not None else self.norm(x)

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype between layers (the weights' may differ: see config.activation_dtype)."""
        return self.layers[0].input_layernorm.weight.dtype

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in fp32 (the last stage's)."""
        assert self.lm_head is not None
        return self.lm_head.project(hidden).float()

    def param_for_checkpoint_name(self, name: str) -> tuple[nn.Module, torch.Tensor, int] | None:
        """Map an HF checkpoint tensor name to (owning module, parameter, shard index); None for
        a tensor this stage does not hold."""
        name = name.removeprefix("model.")
        if name.startswith("embed_tokens.") and self.embed_tokens is None:
            if not (self.config.tie_word_embeddings and self.lm_head is not None):
                return None
            name = name.replace("embed_tokens.", "lm_head.", 1)  # a later stage's tied lm_head
        elif name.startswith("lm_head."):
            if self.config.tie_word_embeddings or self.lm_head is None:
                return None  # tied: the embedding matrix fills it
        elif name.startswith("layers."):
            index, _, rest = name.removeprefix("layers.").partition(".")
            if not index.isdigit() or int(index) not in self.layer_range:
                return None
            name = f"layers.{int(index) - self.layer_range.start}.{rest}"
        shard = 0
        for ckpt, (ours, index) in self.packed_modules.items():
            if f".{ckpt}." in name:
                name, shard = name.replace(ckpt, ours), index
                break
        module_name, _, attr = name.rpartition(".")
        try:
            module = self.get_submodule(module_name)
        except AttributeError:  # also a module this stage does not hold (None)
            return None
        param = getattr(module, attr, None)
        if param is None and getattr(module, "quant", None) is not None:
            param = getattr(module.quant, attr, None)  # qweight / scales / zeros
        if not isinstance(param, torch.Tensor):
            return None
        return module, param, shard
