"""`llmscale prune`: magnitude, 2:4 semi-structured and structured pruning.

Magnitude and 2:4 zero weights in place: the matrices keep their shapes, so dense kernels do the
same work and the model is no faster or smaller on disk (2:4 pays off only with sparse
tensor-core kernels, CUDA only). Structured pruning removes whole MLP channels and whole KV groups
(each with its query heads), the same count in every layer, so the result is a smaller standard
model that dense kernels run faster.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmscale.config import ConfigError
from llmscale.model.llama import is_linear_weight

if TYPE_CHECKING:
    import torch

    from llmscale.model.llama import LlamaForCausalLM

METHODS = ("magnitude", "2:4", "structured")


def validate(method: str, sparsity: float) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; choose {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    if method == "2:4" and sparsity != 0.5:
        raise ConfigError(f"2:4 pruning zeroes exactly half the weights: sparsity must be 0.5, "
                          f"got {sparsity}")


def magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly round(sparsity * numel) weights of smallest magnitude (ties broken by index)."""
    import torch

    k = round(sparsity * w.numel())
    flat = w.detach().flatten().clone()
    if k:
        flat[torch.argsort(flat.abs(), stable=True)[:k]] = 0
    return flat.view_as(w)


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """In every run of four consecutive input weights of a row, zero the two smallest."""
    import torch

    out_f, in_f = w.shape
    if in_f % 4:
        raise ConfigError(f"2:4 pruning needs input sizes divisible by 4, got {in_f}")
    groups = w.detach().reshape(out_f, in_f // 4, 4).clone()
    drop = torch.argsort(groups.abs(), dim=-1, stable=True)[..., :2]
    groups.scatter_(-1, drop, 0.0)
    return groups.view(out_f, in_f)


def prune_unstructured(tensors: dict[str, torch.Tensor], method: str, sparsity: float
                       ) -> dict[str, torch.Tensor]:
    """Every linear layer (not embeddings, lm_head or norms) pruned on its own."""
    from rich.progress import Progress

    out = dict(tensors)
    names = [n for n in tensors if is_linear_weight(n)]
    with Progress(transient=True) as progress:
        for name in progress.track(names, description=f"{method} pruning"):
            w = tensors[name]
            out[name] = prune_2_4(w) if method == "2:4" else magnitude_prune(w, sparsity)
    return out


@dataclass
class Importance:
    """Per layer: a score per MLP channel [I] and per KV group [Hkv]; higher means keep."""

    channels: list[torch.Tensor] = field(default_factory=list)
    groups: list[torch.Tensor] = field(default_factory=list)


def _head_shape(raw: dict[str, Any]) -> tuple[int, int, int]:
    """(num KV groups, query heads per group, head_dim) from an HF config."""
    from llmscale.config import ModelConfig

    cfg = ModelConfig.from_hf(raw)
    return cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim


def weight_importance(tensors: dict[str, torch.Tensor], raw: dict[str, Any]) -> Importance:
    """Scores from weights alone: a channel's gate row x up row x down column norms; a group's
    query heads' q-row norms x o-column norms."""
    hkv, g, d = _head_shape(raw)
    imp = Importance()
    for i in range(int(raw["num_hidden_layers"])):
        p = f"model.layers.{i}."
        gate, up = tensors[p + "mlp.gate_proj.weight"], tensors[p + "mlp.up_proj.weight"]
        down = tensors[p + "mlp.down_proj.weight"]
        imp.channels.append(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0))
        q = tensors[p + "self_attn.q_proj.weight"].reshape(hkv, g, d, -1)
        o = tensors[p + "self_attn.o_proj.weight"].reshape(-1, hkv, g, d)
        imp.groups.append((q.flatten(2).norm(dim=-1) * o.permute(1, 2, 0, 3).flatten(2).norm(dim=-1)).sum(1))
    return imp


def activation_importance(model: LlamaForCausalLM, batches: torch.Tensor) -> Importance:
    """Scores from what each unit adds to the residual stream on calibration text: a channel's
    mean |activation| x its down-projection column norm; a group's summed per-head norm of
    (head output @ its o_proj columns), averaged over tokens."""
    import torch
    from rich.progress import Progress

    from llmscale.compress.dense_forward import causal_hidden

    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n_layers = len(model.layers)
    act_sum = [torch.zeros(cfg.intermediate_size) for _ in range(n_layers)]
    head_sum = [torch.zeros(hq) for _ in range(n_layers)]
    tokens = 0
    hooks = []
    for i, layer in enumerate(model.layers):
        def mlp_hook(_m: Any, args: tuple[torch.Tensor], i: int = i) -> None:
            act_sum[i] += args[0].detach().abs().float().flatten(0, -2).sum(0)

        def attn_hook(m: Any, args: tuple[torch.Tensor], i: int = i) -> None:
            o = args[0].detach().float().reshape(-1, hq, d)  # [N, Hq, D]
            w = m.weight.float().reshape(-1, hq, d)  # [hidden, Hq, D]
            head_sum[i] += torch.einsum("nhd,ehd->nhe", o, w).norm(dim=-1).sum(0)

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook))
    try:
        with torch.inference_mode(), Progress(transient=True) as progress:
            for row in progress.track(batches, description="calibrating"):
                causal_hidden(model, row[None])
                tokens += row.numel()
    finally:
        for h in hooks:
            h.remove()
    imp = Importance()
    for i, layer in enumerate(model.layers):
        down = layer.mlp.down_proj.weight.float()
        imp.channels.append(act_sum[i] / tokens * down.norm(dim=0))
        imp.groups.append((head_sum[i] / tokens).view(hkv, hq // hkv).sum(1))
    return imp


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def shrink_layer(tensors: dict[str, torch.Tensor], layer: int, raw: dict[str, Any],
                 channels: torch.Tensor, groups: torch.Tensor) -> None:
    """Keep only MLP `channels` and KV `groups` (with their query heads) of one layer, in place."""
    hkv, g, d = _head_shape(raw)
    p = f"model.layers.{layer}."
    for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        tensors[p + name] = tensors[p + name][channels].contiguous()
    tensors[p + "mlp.down_proj.weight"] = tensors[p + "mlp.down_proj.weight"][:, channels].contiguous()
    for part, per_group in (("q_proj", g), ("k_proj", 1), ("v_proj", 1)):
        for kind in ("weight", "bias"):
            name = f"{p}self_attn.{part}.{kind}"
            if name in tensors:
                t = tensors[name]
                t = t.reshape(hkv, per_group * d, *t.shape[1:])[groups]
                tensors[name] = t.reshape(-1, *t.shape[2:]).contiguous()
    o = tensors[p + "self_attn.o_proj.weight"]
    o = o.reshape(o.shape[0], hkv, g * d)[:, groups]  # [hidden, kept groups, G * D]
    tensors[p + "self_attn.o_proj.weight"] = o.flatten(1).contiguous()


def structured_prune(tensors: dict[str, torch.Tensor], raw: dict[str, Any], sparsity: float,
                     head_sparsity: float, importance: Importance
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Remove round(sparsity * I) MLP channels and floor(head_sparsity * Hkv) KV groups (at least
    one kept) in every layer. Returns (tensors, config.json updates)."""
    hkv, g, d = _head_shape(raw)
    inter = int(raw["intermediate_size"])
    keep_channels = max(1, inter - round(sparsity * inter))
    keep_groups = max(1, hkv - int(head_sparsity * hkv))
    out = dict(tensors)
    for i in range(int(raw["num_hidden_layers"])):
        shrink_layer(out, i, raw, keep_top(importance.channels[i], keep_channels),
                     keep_top(importance.groups[i], keep_groups))
    updates = {"intermediate_size": keep_channels, "num_attention_heads": keep_groups * g,
               "num_key_value_heads": keep_groups, "head_dim": d}
    return out, updates


def forward_ms(model: LlamaForCausalLM, tokens: int = 128, repeats: int = 5) -> float:
    """Median wall time of one dense forward over `tokens` tokens (no lm_head), in ms."""
    import torch

    from llmscale.compress.dense_forward import causal_hidden

    ids = torch.arange(tokens)[None] % model.config.vocab_size
    times = []
    with torch.inference_mode():
        causal_hidden(model, ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            causal_hidden(model, ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


@dataclass
class PruneReport:
    method: str
    sparsity: float
    out: Path
    params_before: int
    params_after: int
    linear_sparsity: float  # fraction of zeros over all linear weights, relative to the original count
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # layer 0's linears: before, after
    config_updates: dict[str, Any]
    forward_ms_before: float
    forward_ms_after: float


def prune(model: str | None, method: str, sparsity: float, out: str | Path,
          head_sparsity: float | None = None, calibration_samples: int = 8, seq_len: int = 256,
          time_forward: bool = True) -> PruneReport:
    """Prune MODEL (None: the default model) and save the result as an HF folder at `out`."""
    import torch

    from llmscale.compress.checkpoint import (
        build_model,
        hf_tensors,
        load_model,
        read_raw_config,
        save_tensors,
    )
    from llmscale.compress.dense_forward import corpus_token_ids, windows

    validate(method, sparsity)
    head_sparsity = sparsity if head_sparsity is None else head_sparsity
    if not 0.0 <= head_sparsity < 1.0:
        raise ConfigError(f"head sparsity must be in [0, 1), got {head_sparsity}")
    net, folder = load_model(model, torch.float32)
    raw = read_raw_config(folder)
    tensors = hf_tensors(net)
    updates: dict[str, Any] = {}
    if method == "structured":
        if calibration_samples > 0:
            batches = windows(corpus_token_ids(folder), calibration_samples, seq_len)
            importance = activation_importance(net, batches)
        else:
            importance = weight_importance(tensors, raw)
        pruned, updates = structured_prune(tensors, raw, sparsity, head_sparsity, importance)
    else:
        pruned = prune_unstructured(tensors, method, sparsity)
    record = {"method": method, "sparsity": sparsity}
    if method == "structured":
        record["head_sparsity"] = head_sparsity
    save_tensors(pruned, out, folder, {**updates, "pruning": record})

    linear_before = sum(t.numel() for n, t in tensors.items() if is_linear_weight(n))
    linear_nonzero = sum(int(t.count_nonzero()) for n, t in pruned.items() if is_linear_weight(n))
    shapes = {n.removeprefix("model.layers.0."): (tuple(tensors[n].shape), tuple(pruned[n].shape))
              for n in tensors if n.startswith("model.layers.0.") and is_linear_weight(n)}
    before_ms = after_ms = float("nan")
    if time_forward:
        before_ms = forward_ms(net)
        after_ms = forward_ms(build_model({**raw, **updates}, pruned))
    return PruneReport(method, sparsity, Path(out), sum(t.numel() for t in tensors.values()),
                       sum(t.numel() for t in pruned.values()), 1 - linear_nonzero / linear_before,
                       shapes, updates, before_ms, after_ms)


def print_report(r: PruneReport) -> None:
    from rich.table import Table

    from llmscale.console import stdout_console

    console = stdout_console()
    table = Table(title=f"{r.method} pruning -> {r.out}")
    table.add_column("layer 0 linear")
    table.add_column("shape before")
    table.add_column("shape after")
    for name, (before, after) in r.shapes.items():
        table.add_row(name, "x".join(map(str, before)), "x".join(map(str, after)))
    console.print(table)
    console.print(f"parameters {r.params_before / 1e6:.2f}M -> {r.params_after / 1e6:.2f}M; "
                  f"linear weights zero or removed: {r.linear_sparsity:.2%}")
    if r.config_updates:
        console.print("config: " + ", ".join(f"{k}={v}" for k, v in r.config_updates.items()))
    console.print(f"dense forward, 128 tokens: {r.forward_ms_before:.1f} ms -> {r.forward_ms_after:.1f} ms")
    if r.method == "structured":
        console.print("structured pruning shrinks the matrices: dense kernels do less work.")
    else:
        console.print(f"{r.method} pruning keeps dense shapes: dense kernels still multiply the zeros, "
                      "so no speedup or smaller file (2:4 needs sparse tensor-core kernels, CUDA only).")


def cmd_prune(args: argparse.Namespace) -> None:
    report = prune(args.model, args.method, args.sparsity, args.out, head_sparsity=args.head_sparsity,
                   calibration_samples=args.calibration_samples, seq_len=args.seq_len)
    print_report(report)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prune", help="prune a model (magnitude, 2:4 or structured) into a new folder")
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of weights to zero (magnitude), 0.5 for 2:4, fraction of MLP channels "
                        "to remove (structured); default 0.5")
    p.add_argument("--head-sparsity", type=float, default=None,
                   help="structured: fraction of KV groups (with their query heads) to remove, rounded "
                        "down (default: --sparsity)")
    p.add_argument("--calibration-samples", type=int, default=8,
                   help="structured: corpus windows that score channels and heads by their activations "
                        "(0: score by weights alone)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--out", required=True, help="output folder (an HF model folder)")
    p.set_defaults(func=cmd_prune)
