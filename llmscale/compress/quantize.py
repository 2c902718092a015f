"""`llmscale quantize`: post-training weight-only quantization into a checkpoint the engine
serves with int8/int4 kernels (formats in `llmscale.model.quant`).

Every linear inside the decoder layers becomes int8 (symmetric per output channel) or int4
(asymmetric per group of inputs, round to nearest); the token embedding and lm_head become
int8 per row, since they are the largest matrix of a small model and read once per token;
norms and biases are copied. The config records the method, so loading never re-quantizes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmscale.config import QUANT_METHODS, ConfigError, ModelConfig, QuantConfig

GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantizeReport:
    out: Path
    method: str
    bytes_before: int
    bytes_after: int
    seconds: float


def quant_config(method: str, group_size: int, model_cfg: ModelConfig | None = None) -> QuantConfig:
    if method not in QUANT_METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose {', '.join(QUANT_METHODS)}")
    bits = QUANT_METHODS[method]
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    cfg = QuantConfig(bits=bits, group_size=group_size if bits == 4 else 0)
    if model_cfg is not None:
        cfg.validate(model_cfg.hidden_size, model_cfg.intermediate_size,
                     model_cfg.num_attention_heads * model_cfg.head_dim)
    return cfg


def quantize_tensors(tensors: dict[str, Any], cfg: QuantConfig) -> dict[str, Any]:
    """HF-named dense tensors -> HF-named quantized ones (`<prefix>.qweight`, `.scales`, ...)."""
    from llmscale.model.llama import EMBEDDING_NAMES, is_linear_weight
    from llmscale.model.quant import pack_nibbles, quantize_int4, quantize_int8

    out = {}
    for name, t in tensors.items():
        prefix = name.removesuffix(".weight")
        if is_linear_weight(name) and cfg.bits == 4:
            codes, scales, zeros = quantize_int4(t, cfg.group_size)
            out |= {f"{prefix}.qweight": pack_nibbles(codes), f"{prefix}.scales": scales.half(),
                    f"{prefix}.zeros": zeros.half()}
        elif is_linear_weight(name) or (name in EMBEDDING_NAMES and cfg.embedding_bits == 8):
            q, scales = quantize_int8(t)
            out |= {f"{prefix}.qweight": q, f"{prefix}.scales": scales.half()}
        else:
            out[name] = t
    return out


def quantize_model(model: str | None, method: str, group_size: int, out: str | Path,
                   show_progress: bool = True) -> QuantizeReport:
    """Quantize MODEL (None: the built-in default) into an HF folder at `out`."""
    from rich.progress import Progress
    from safetensors import safe_open

    from llmscale.compress.checkpoint import read_raw_config, save_tensors
    from llmscale.model.lookup import resolve_model

    start = time.perf_counter()
    src = resolve_model(model)
    raw = read_raw_config(src)
    if raw.get("quantization_config"):
        raise ConfigError(f"{src} is already quantized ({raw['quantization_config'].get('bits')}-bit)")
    cfg = quant_config(method, group_size, ModelConfig.from_hf(raw))
    files = sorted(src.glob("*.safetensors"))
    tied = bool(raw.get("tie_word_embeddings", False))
    quantized: dict[str, Any] = {}
    with Progress(transient=True, disable=not show_progress) as progress:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                names = [n for n in f.keys() if not (tied and n == "lm_head.weight")]
                task = progress.add_task(f"quantizing {file.name} to {method}", total=len(names))
                for name in names:  # one tensor at a time: never two dense copies of the model
                    quantized |= quantize_tensors({name: f.get_tensor(name).float()}, cfg)
                    progress.advance(task)
    save_tensors(quantized, out, src, {"quantization_config": cfg.to_hf()})
    out = Path(out)
    return QuantizeReport(out, method, sum(f.stat().st_size for f in files),
                          (out / "model.safetensors").stat().st_size, time.perf_counter() - start)


def cmd_quantize(args: argparse.Namespace) -> None:
    quant_config(args.method, args.group_size)  # bad flags fail before the model loads
    report = quantize_model(args.model, args.method, args.group_size, args.out)
    print(f"{report.method}: {report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB "
          f"({report.bytes_before / report.bytes_after:.2f}x smaller) in {report.seconds:.1f}s; "
          f"serve it with: llmscale serve --model {report.out}")


def register(sub: Any) -> None:
    p = sub.add_parser("quantize", help="int8/int4 weight-only quantization into a servable checkpoint")
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--method", required=True, help="int8 (per channel) or int4 (per group)")
    p.add_argument("--group-size", type=int, default=32, help="int4: inputs per scale/zero group")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_quantize)
