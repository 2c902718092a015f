"""Read a GGUF file and write it out as a Hugging Face folder.

The engine only loads HF folders (config.json + safetensors + tokenizer.json). Converting a
GGUF dequantizes every tensor to fp32 under its HF name and rebuilds the config and tokenizer
from the metadata; `lookup.resolve_model` decides when to convert and where the result is cached.

The header is parsed here with `struct` over an mmap rather than with `gguf.GGUFReader`:
the reader builds a numpy view per vocabulary string and takes 4-7 s on a 49k-token file,
where this takes ~0.1 s. Dequantization and the type tables still come from `gguf`.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, TokenType, quants
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from llmscale.config import ConfigError

log = logging.getLogger(__name__)

# Bump when the converter's output changes, so caches written by older code are not reused.
CONVERTER_VERSION = 1

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# llama.cpp's Llama converter (Llama, Mistral) reorders q/k rows for its interleaved rope kernel;
# its Qwen converters keep HF's half-split layout.
ROPE_PERMUTED = {"llama", "mistral"}

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama 3.1+ rope scaling, stored as per-frequency divisors: turned back into config parameters.
ROPE_FREQS = "rope_freqs.weight"
# (original context, low_freq_factor, high_freq_factor) Meta has published for llama3 rope scaling.
LLAMA3_ROPE_SETTINGS = ((8192, 1.0, 4.0),)

# Pre-tokenizer split regexes by `tokenizer.ggml.pre` (the ones llama.cpp and HF tokenizer.json use).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# GPT-2's regex after isolating every digit (llama.cpp: "\p{N}" then the GPT-2 pattern).
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact"}
GPT2_PRE = {"default", "gpt-2", "gpt2"}


# --------------------------------------------------------------------------- GGUF parsing

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists the fastest-moving dimension first)
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: list[TensorInfo]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    """Bounds-checked little-endian reads; any overrun means a truncated or corrupt header."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, fmt: str) -> Any:
        n = struct.calcsize("<" + fmt)
        if self.pos + n > self.size:
            raise ValueError("header runs past the end of the file")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise ValueError("string runs past the end of the file")
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALAR:
                fmt = f"{count}{_SCALAR[etype]}"
                n = struct.calcsize("<" + fmt)
                if self.pos + n > self.size:
                    raise ValueError("array runs past the end of the file")
                values = list(struct.unpack_from("<" + fmt, self.buf, self.pos))
                self.pos += n
                return values
            if count > self.size - self.pos:  # every element takes at least one byte
                raise ValueError("array length exceeds the file")
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF's metadata and tensor table; tensor data stays on disk."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf)
    except FileNotFoundError:
        raise ConfigError(f"GGUF file {path} does not exist") from None
    except ConfigError:
        raise
    except (OSError, ValueError, struct.error, UnicodeDecodeError, KeyError) as e:
        raise ConfigError(f"{path} is not a valid GGUF file ({e})") from None


def _parse(path: Path, buf: mmap.mmap) -> GGUFFile:
    cur = _Cursor(buf)
    if buf[:4] != b"GGUF":
        raise ValueError("missing GGUF magic bytes")
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (big-endian files are not supported)")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    if n_tensors > cur.size or n_kv > cur.size:
        raise ValueError("implausible tensor or key count")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"))
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = tuple(cur.take("Q") for _ in range(n_dims))
        raw.append((name, tuple(reversed(dims)), cur.take("I"), cur.take("Q")))
    align = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors = []
    for name, shape, type_id, offset in raw:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ConfigError(f"{path}: tensor {name} has unknown ggml type {type_id}") from None
        elements = prod(shape)
        if shape and shape[-1] % block:
            raise ValueError(f"tensor {name} rows are not whole {qtype.name} blocks")
        start, nbytes = data_start + offset, elements // block * type_size
        if start + nbytes > cur.size:
            raise ConfigError(f"{path} is truncated: tensor {name} ends at byte {start + nbytes} "
                              f"but the file has {cur.size} bytes")
        tensors.append(TensorInfo(name, shape, qtype, start, nbytes))
    return GGUFFile(path, metadata, tensors)


def dequantize(data: np.ndarray, info: TensorInfo) -> np.ndarray:
    block, type_size = GGML_QUANT_SIZES[info.qtype]
    row_bytes = info.shape[-1] // block * type_size
    raw = data.reshape(-1, row_bytes)
    try:
        values = quants.dequantize(raw, info.qtype)
    except NotImplementedError:
        raise ConfigError(f"cannot dequantize {info.qtype.name} tensor {info.name}") from None
    return np.asarray(values, dtype=np.float32).reshape(info.shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: per head it stores rotary pairs interleaved (x0, x_d/2, x1, ...);
    HF's rotate_half wants the two halves contiguous. Rows of q (or k, with the kv head count)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- config

def _architecture(g: GGUFFile) -> tuple[str, str, str]:
    """(GGUF key prefix, HF class, HF model_type)."""
    arch = str(g.get("general.architecture", ""))
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{g.path.name}: unsupported GGUF architecture {arch!r}; "
                          f"supported: {', '.join(sorted(ARCHITECTURES))}")
    cls, model_type = ARCHITECTURES[arch]
    # llama.cpp files Mistral under "llama"; only the name tells them apart.
    if arch == "llama" and "mistral" in str(g.get("general.name", "")).lower():
        cls, model_type = ARCHITECTURES["mistral"]
    return arch, cls, model_type


def build_hf_config(g: GGUFFile) -> dict[str, Any]:
    arch, cls, model_type = _architecture(g)

    def need(key: str) -> Any:
        value = g.get(f"{arch}.{key}")
        if value is None:
            raise ConfigError(f"{g.path.name}: GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):  # per-layer values (hybrid models) have no HF Llama equivalent
            raise ConfigError(f"{g.path.name}: per-layer {arch}.{key} is not supported")
        return value

    names = {t.name for t in g.tensors}
    embed = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ConfigError(f"{g.path.name}: GGUF has no token_embd.weight tensor")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = g.get(f"{arch}.attention.key_length")
    if head_dim is None and arch in ROPE_PERMUTED:
        head_dim = g.get(f"{arch}.rope.dimension_count")
    bos, eos = g.get("tokenizer.ggml.bos_token_id"), g.get("tokenizer.ggml.eos_token_id")
    cfg: dict[str, Any] = {
        "architectures": [cls],
        "model_type": model_type,
        "vocab_size": embed.shape[0],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": int(head_dim or hidden // heads),
        "hidden_act": "silu",
        "max_position_embeddings": int(g.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(g.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    if model_type in ("llama", "mistral"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = False
    if g.get("tokenizer.ggml.padding_token_id") is not None:
        cfg["pad_token_id"] = g.get("tokenizer.ggml.padding_token_id")
    if g.get(f"{arch}.attention.sliding_window") is not None:
        cfg["sliding_window"] = int(g.get(f"{arch}.attention.sliding_window"))
    elif model_type == "mistral":
        cfg["sliding_window"] = None
    scaling = g.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope: dict[str, Any] = {"rope_type": scaling,
                                "factor": float(g.get(f"{arch}.rope.scaling.factor", 1.0))}
        orig = g.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            rope["original_max_position_embeddings"] = int(orig)
        cfg["rope_scaling"] = rope
    return cfg


def llama3_rope_scaling(divisors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """HF's llama3 rope parameters that reproduce llama.cpp's `rope_freqs` divisors, or None.

    llama.cpp keeps only the divisors it computed from the parameters; we try the published
    settings with factor = the largest divisor and accept the one that gives them back.
    """
    factor = float(divisors.max())
    if factor <= 1.0:
        return None
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    for orig, low, high in LLAMA3_ROPE_SETTINGS:
        smooth = (orig / wavelen - low) / (high - low)
        expected = np.where(wavelen < orig / high, 1.0,
                            np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
        if expected.shape == divisors.shape and np.allclose(expected, divisors, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    return None


def _generation_config(g: GGUFFile) -> dict[str, Any]:
    # Chat models end a turn with EOT (e.g. <|eot_id|>) which may differ from EOS: stop on both.
    eos = [g.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(int(e) for e in eos if e is not None))
    out: dict[str, Any] = {"bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
                           "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
    if g.get("tokenizer.ggml.padding_token_id") is not None:
        out["pad_token_id"] = g.get("tokenizer.ggml.padding_token_id")
    return out


# --------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE writes tokens in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece files carry scores, not merges: a piece's score ranks the merge making it.
    Same order as transformers' `generate_merges`, so both build identical tokenizers."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[str, str, float]] = []
    for piece, score in dict(zip(tokens, scores, strict=True)).items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def bos_eos_processor(tok: Tokenizer, bos: str | None,
                      eos: str | None) -> processors.TemplateProcessing:
    """`[bos] $A [eos]` (each only when given), as transformers builds it from add_bos/eos_token."""
    def seq(part: str, type_id: int) -> str:
        return " ".join([*([f"{bos}:{type_id}"] if bos else []), f"{part}:{type_id}",
                         *([f"{eos}:{type_id}"] if eos else [])])
    specials = [(t, tok.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    missing = [t for t, i in specials if i is None]
    if missing:
        raise ConfigError(f"special token {missing[0]!r} is not in the vocabulary")
    return processors.TemplateProcessing(single=seq("$A", 0), pair=seq("$A", 0) + " " + seq("$B", 1),
                                         special_tokens=specials)


def build_tokenizer(g: GGUFFile) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer the metadata describes, and its tokenizer_config.json."""
    kind = g.get("tokenizer.ggml.model")
    tokens: list[str] = list(g.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ConfigError(f"{g.path.name}: GGUF has no tokenizer.ggml.tokens")
    types: list[int] = list(g.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens))
    if kind == "gpt2":
        tok, add_bos = _byte_level_tokenizer(g, tokens), bool(g.get("tokenizer.ggml.add_bos_token", False))
        # A CONTROL token spelled outside the byte alphabet is a converter mislabel, not a real special.
        alphabet: set[str] | None = set(_bytes_to_unicode().values())
    elif kind == "llama":
        # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
        tok, add_bos = _sentencepiece_tokenizer(g, tokens), bool(g.get("tokenizer.ggml.add_bos_token", True))
        alphabet = None
    else:
        raise ConfigError(f"{g.path.name}: unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
    added = [(t, ty) for t, ty in zip(tokens, types, strict=True)
             if ty in (TokenType.CONTROL, TokenType.USER_DEFINED)
             and (alphabet is None or set(t) <= alphabet)]
    # CONTROL tokens are specials (skipped when decoding); USER_DEFINED ones (e.g. <think>) are
    # plain text that must still be matched whole.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in added if ty == TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in added if ty == TokenType.USER_DEFINED])

    def name(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = name("bos"), name("eos")
    add_bos = add_bos and bos is not None
    add_eos = bool(g.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    tok.post_processor = bos_eos_processor(tok, bos if add_bos else None, eos if add_eos else None)

    config: dict[str, Any] = {
        # Named explicitly: left out, AutoTokenizer would pick a class from model_type ("llama")
        # and could rebuild a sentencepiece pipeline over a byte-level vocabulary.
        "tokenizer_class": "PreTrainedTokenizerFast",
        # Informational: the post-processor above is what inserts them.
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": name("unknown"),
        "pad_token": name("padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(g.get(f"{g.get('general.architecture')}.context_length", 2048)),
    }
    template = g.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config


def _byte_level_tokenizer(g: GGUFFile, tokens: list[str]) -> Tokenizer:
    table = _bytes_to_unicode()
    alphabet = set(table.values())
    # Tokens are normally already spelled in GPT-2's byte alphabet; re-spell any that are not.
    spelled = [t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8")) for t in tokens]
    merges_raw = g.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ConfigError(f"{g.path.name}: byte-level GGUF tokenizer has no tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    vocab = {t: i for i, t in enumerate(spelled)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = str(g.get("tokenizer.ggml.pre", "default"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in SPLIT_REGEXES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        if pre not in GPT2_PRE:
            log.warning("%s: unknown pre-tokenizer %r, splitting text like GPT-2", g.path.name, pre)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_tokenizer(g: GGUFFile, tokens: list[str]) -> Tokenizer:
    merges_raw = g.get("tokenizer.ggml.merges")
    if merges_raw:
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    else:
        scores = g.get("tokenizer.ggml.scores")
        if not scores:
            raise ConfigError(f"{g.path.name}: sentencepiece GGUF tokenizer has neither merges nor scores")
        merges = _merges_from_scores(tokens, scores)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = g.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


# --------------------------------------------------------------------------- writing

def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def _write_safetensors(f: BinaryIO, entries: list[tuple[str, tuple[int, ...]]],
                       tensors: Iterator[np.ndarray]) -> None:
    """Stream fp32 tensors into one safetensors file: peak memory is one tensor, not the model."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for (name, shape), arr in zip(entries, tensors, strict=True):
        assert arr.shape == shape, name
        f.write(np.ascontiguousarray(arr, dtype="<f4").data)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, keep_quantized: bool = False) -> None:
    """Write an HF folder for `gguf_path` at `out_dir` (which must not exist yet).

    `keep_quantized`: linears stay int8/int4 (see `gguf_quantized`), the rest as usual.

    Everything is written to a sibling temp folder and renamed into place, so `out_dir` either
    does not exist or is complete. If another process finished the same folder first, its
    copy is kept.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    g = read_gguf(gguf_path)
    cfg = build_hf_config(g)
    tokenizer, tok_config = build_tokenizer(g)
    arch = _architecture(g)[0]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    entries: list[tuple[str, tuple[int, ...]]] = []
    plan: list[tuple[TensorInfo, int | None]] = []  # tensor, head count to un-permute rows by
    for info in g.tensors:
        name = _hf_name(info.name)
        if info.name == ROPE_FREQS:
            continue
        if name is None:
            raise ConfigError(f"{gguf_path.name}: unexpected tensor {info.name} for architecture {arch!r}")
        n_head = None
        if arch in ROPE_PERMUTED and (".attn_q." in info.name or ".attn_k." in info.name):
            n_head = heads if ".attn_q." in info.name else kv_heads
        entries.append((name, info.shape))
        plan.append((info, n_head))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with open(gguf_path, "rb") as src:

            def tensors() -> Iterator[np.ndarray]:
                for info, n_head in plan:
                    src.seek(info.offset)
                    raw = np.frombuffer(src.read(info.nbytes), dtype=np.uint8)
                    if raw.size != info.nbytes:
                        raise ConfigError(f"{gguf_path} is truncated inside tensor {info.name}")
                    w = dequantize(raw, info)
                    yield w if n_head is None else unpermute_rope(w, n_head)

            if keep_quantized:
                from llmscale.model.gguf_quantized import write_quantized

                cfg["quantization_config"] = write_quantized(
                    tmp / "model.safetensors", gguf_path, [e[0] for e in entries], plan, src).to_hf()
            else:
                with open(tmp / "model.safetensors", "wb") as f:
                    _write_safetensors(f, entries, tensors())
            freqs = next((t for t in g.tensors if t.name == ROPE_FREQS), None)
            if freqs is not None:
                src.seek(freqs.offset)
                divisors = dequantize(np.frombuffer(src.read(freqs.nbytes), dtype=np.uint8), freqs)
                scaling = llama3_rope_scaling(divisors, cfg["rope_theta"], cfg["head_dim"])
                if scaling is not None:
                    cfg["rope_scaling"] = scaling
                else:
                    log.warning("%s: rope_freqs matches no known llama3 rope scaling and is dropped; "
                                "outputs will drift from llama.cpp's", gguf_path.name)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(g), indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        for file in tmp.iterdir():  # on disk before the rename publishes them, even across a power cut
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, out_dir)
        except OSError as e:
            if not (out_dir / "config.json").is_file():
                raise ConfigError(f"cannot create {out_dir}: {e.strerror}") from None
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent conversion won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

