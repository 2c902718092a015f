"""A plain causal forward over our model's own modules, for training and scoring.

The engine's forward works on a flat token batch against the paged KV cache; compression needs
`[B, T]` batches of equal-length windows with gradients, so this runs the same submodules
(norms, packed projections, rotary, MLP, lm_head) with one causal SDPA call per layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmscale.model.llama import Attention, DecoderLayer, LlamaForCausalLM


def _attention(attn: Attention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    d = attn.head_dim
    q, k, v = attn.qkv_proj(x).split(
        [attn.num_heads * d, attn.num_kv_heads * d, attn.num_kv_heads * d], dim=-1)
    q = q.view(b, t, attn.num_heads, d)  # [B, T, Hq, D]
    k = k.view(b, t, attn.num_kv_heads, d)  # [B, T, Hkv, D]
    v = v.view(b, t, attn.num_kv_heads, d)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = attn.rotary(positions, q, k)  # tables are [T, 1, D/2]: they broadcast over B
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=attn.scale, enable_gqa=True)
    return attn.o_proj(o.transpose(1, 2).reshape(b, t, attn.num_heads * d))  # [B, T, hidden]


def _layer(layer: DecoderLayer, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    x = x + _attention(layer.self_attn, layer.input_layernorm(x), positions)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def causal_hidden(model: LlamaForCausalLM, input_ids: torch.Tensor
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """input_ids [B, T] -> (final normed hidden [B, T, hidden], each layer's output [B, T, hidden])."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    x = model.embed_tokens(input_ids)
    per_layer = []
    for layer in model.layers:
        x = _layer(layer, x, positions)
        per_layer.append(x)
    return model.norm(x), per_layer


def causal_logits(model: LlamaForCausalLM, input_ids: torch.Tensor, output_hidden_states: bool = False
                  ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """input_ids [B, T] -> logits [B, T, vocab] in fp32 (row t predicts token t + 1), plus each
    layer's output when `output_hidden_states`."""
    hidden, per_layer = causal_hidden(model, input_ids)
    logits = F.linear(hidden, model.lm_head.weight).float()
    return (logits, per_layer) if output_hidden_states else logits


def set_trainable(model: LlamaForCausalLM, trainable: bool = True) -> LlamaForCausalLM:
    """Our layers create their weights frozen (inference); a student needs gradients."""
    for p in model.parameters():
        p.requires_grad_(trainable)
    return model.train(trainable)


def corpus_token_ids(tokenizer_folder: Path, data_file: str | Path | None = None) -> torch.Tensor:
    """The shipped corpus (or `data_file`) as one token stream [N], encoded with the model's
    tokenizer; windows cut from it feed calibration and distillation."""
    from llmscale.config import ConfigError
    from llmscale.model.tokenizer import Tokenizer

    path = Path(data_file) if data_file else Path(__file__).resolve().parent.parent / "data" / "corpus.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read text file {path}: {e}") from None
    ids = Tokenizer.from_folder(tokenizer_folder).encode(text, add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, count: int, seq_len: int, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """`count` windows [count, seq_len]: random starts with a generator, else evenly spaced."""
    from llmscale.config import ConfigError

    if tokens.numel() < seq_len + 1:
        raise ConfigError(f"the text has {tokens.numel()} tokens, fewer than --seq-len {seq_len} + 1")
    last = tokens.numel() - seq_len
    if generator is None:
        starts = torch.linspace(0, last, count).long()
    else:
        starts = torch.randint(0, last + 1, (count,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
