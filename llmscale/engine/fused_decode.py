"""A decode step over every decoder layer in one C call (`decode_step` in kernels/cpu.c).

Between two decoder layers the per-op path returns to Python a dozen times; on a 2-core CPU
that costs ~8 ms per step for SmolLM2-135M, a third of an int4 step. When a step is decodes
only and the model's layers all have C kernels, the runner hands the whole stack to C: the
same math (norms, packed projections, rotary, paged attention, SwiGLU) in the same order.
The layer descriptors point at the model's own tensors and KV caches, so they are built once.

A bf16 model (the default on CPUs with bf16 arithmetic) runs it too: its bf16 weights are read
as they are, its norms and biases are copied to fp32 once, its bf16 KV cache is read in place
and written rounded to nearest even, and the residual stream and the projections' outputs stay
fp32, where the per-op path rounds them to bf16 after every op (so the two agree up to
near-ties). A linear that multiplies bf16 pairs gets its input in bf16, rounded by the op that
makes it as the linear would round it.
"""

from __future__ import annotations

import ctypes

import torch

from llmscale.config import available_memory_bytes
from llmscale.kernels import cpu as cpu_kernels
from llmscale.model import layers as layers_mod
from llmscale.model.linear_method import (
    BF16_ROW_MAJOR_MAX_ROWS,
    INT_C_KERNEL_MAX_ROWS,
    DenseCLinear,
    PairPanelsLinear,
    PanelsLinear,
    QuantizedCLinear,
    SwigluPanelsLinear,
)
from llmscale.model.llama import LlamaForCausalLM

(DENSE_F32, DENSE_BF16, INT8, INT4, PANELS_F32, PANELS_SWIGLU_F32, PANELS_BF16, PANELS_SWIGLU_BF16,
 PAIR_PANELS_BF16, PAIR_PANELS_SWIGLU_BF16) = range(10)
PAIR_PANELS = {PAIR_PANELS_BF16, PAIR_PANELS_SWIGLU_BF16}
PACKED_BF16 = {PANELS_BF16, PANELS_SWIGLU_BF16, *PAIR_PANELS}
# Decodes per step the fused path takes, by the weights' kind. Quantized: beyond these
# dequantize + GEMM wins (llmscale.model.linear_method). Dense fp32: at 33-64 decodes the row-major
# C matmuls and oneDNN's are close (see llmscale.model.linear_method), and one C call still saves the
# per-op path's dispatch: 261-295 ms against 277-329 ms per step at 48 decodes (min-median,
# steps alternated in one process; 2-core AVX2 CPU, SmolLM2-135M). Prepacked fp32 panels are
# what the per-op path would multiply with too, at any batch.
MAX_ROWS = {DENSE_F32: 64, DENSE_BF16: 64,  # DENSE_BF16: also bf16 weights with fp32 activations
            INT8: INT_C_KERNEL_MAX_ROWS[8], INT4: INT_C_KERNEL_MAX_ROWS[4],
            **dict.fromkeys((PANELS_F32, PANELS_SWIGLU_F32, *PACKED_BF16), 1 << 20)}
# A bf16 model on a CPU with bf16 arithmetic: past this many decodes the per-op path's oneDNN
# bf16 GEMMs catch up with the C kernels on bf16 weights widened to fp32 (level at 96;
# BENCHMARKS.md, "bf16 decode steps"). Pair panels, which multiply bf16 pairs, beat the per-op
# path at every batch measured (1-256 decodes): a model whose linears all take them has no limit.
BF16_ACTIVATIONS_MAX_ROWS = 64


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("pad", ctypes.c_int32), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("group", ctypes.c_int64), ("w", ctypes.c_void_p),
                ("s", ctypes.c_void_p), ("z", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class _Decoder(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("hq", ctypes.c_int64), ("hkv", ctypes.c_int64),
                ("d", ctypes.c_int64), ("inter", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("num_layers", ctypes.c_int64), ("kv_bf16", ctypes.c_int64), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("layers", ctypes.POINTER(_Layer))]


def _cpu_float(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous() and t.device.type == "cpu"


def _as_fp32(t: torch.Tensor, held: list[torch.Tensor]) -> int:
    """The address of `t` in fp32: itself, or a copy kept alive in `held`."""
    if t.dtype != torch.float32:
        t = t.float()
        held.append(t)
    return t.data_ptr()


def _linear(layer: torch.nn.Module, held: list[torch.Tensor], pack_bf16: bool) -> _Linear | None:
    """The C descriptor of a (Column|Row)ParallelLinear from its method's kernel and operand,
    or None if it has no C kernel. With `pack_bf16`, bf16 weights that the per-op path reads as
    stored are packed into panels for the step (the copy kept in `held`): in pairs along k where
    the CPU multiplies bf16 pairs (AVX-512 BF16) and the outputs fill pairs of panels, the
    activations then rounded to bf16 as the per-op path's are; else widened as they load."""
    if layer.tp_size != 1:
        return None
    bias = layer.bias
    if bias is not None and not _cpu_float(bias):
        return None
    method = layer.method
    if isinstance(method, SwigluPanelsLinear):  # its product is the SwiGLU activation
        w = layer.weight
        desc = _Linear(kind=PANELS_SWIGLU_F32, n=w.shape[0], k=w.shape[1], w=method.packed.data_ptr())
    elif isinstance(method, PairPanelsLinear) and pack_bf16:
        w = layer.weight
        kind = PAIR_PANELS_SWIGLU_BF16 if method.fuses_swiglu else PAIR_PANELS_BF16
        desc = _Linear(kind=kind, n=w.shape[0], k=w.shape[1], w=method.packed.data_ptr())
    elif isinstance(method, PanelsLinear):
        w = layer.weight
        desc = _Linear(kind=PANELS_F32, n=w.shape[0], k=w.shape[1], w=method.packed.data_ptr())
    elif isinstance(method, DenseCLinear) and pack_bf16 and layer.weight.dtype == torch.bfloat16:
        w = layer.weight
        swiglu = layer.feeds_swiglu and w.shape[0] % 16 == 0
        panels = cpu_kernels.pack_swiglu_panels(w) if swiglu else cpu_kernels.pack_panels(w)
        kind = PANELS_SWIGLU_BF16 if swiglu else PANELS_BF16
        if cpu_kernels.fits_pair_panels(w):
            panels = cpu_kernels.pack_pair_panels(panels)
            kind = PAIR_PANELS_SWIGLU_BF16 if swiglu else PAIR_PANELS_BF16
        held.append(panels)
        desc = _Linear(kind=kind, n=w.shape[0], k=w.shape[1], w=panels.data_ptr())
    elif isinstance(method, DenseCLinear | PairPanelsLinear):  # bf16 pairs: the few-rows copy
        w = layer.weight
        kind = DENSE_F32 if w.dtype == torch.float32 else DENSE_BF16
        desc = _Linear(kind=kind, n=w.shape[0], k=w.shape[1], w=w.data_ptr())
    elif isinstance(method, QuantizedCLinear):
        quant = method.quant
        desc = _Linear(kind=INT8 if quant.bits == 8 else INT4, n=quant.out_features,
                       k=quant.in_features, group=quant.group_size, w=quant.qweight.data_ptr(),
                       s=quant.c_scales.data_ptr(),
                       z=quant.c_zeros.data_ptr() if quant.c_zeros is not None else None)
    else:
        return None
    desc.bias = _as_fp32(bias, held) if bias is not None else None
    return desc


def _kinds(layers: list[_Layer]) -> set[int]:
    """The kinds of weights the layers' linears multiply."""
    return {lin.kind for layer in layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)}


def _layers(model: LlamaForCausalLM, held: list[torch.Tensor], pack_bf16: bool) -> list[_Layer] | None:
    """Every decoder layer's descriptor, or None if some part has no C path."""
    layers = []
    for layer in model.layers:
        a, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if a.q_norm is not None or not all(map(_cpu_float, (a.k_cache, a.v_cache, *norms))):
            return None
        linears = [_linear(m, held, pack_bf16)
                   for m in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(lin is None for lin in linears):
            return None
        layers.append(_Layer(*linears, input_norm=_as_fp32(norms[0], held),
                             post_norm=_as_fp32(norms[1], held),
                             k_cache=a.k_cache.data_ptr(), v_cache=a.v_cache.data_ptr()))
    return layers


class FusedDecoder:
    """Runs `model`'s decoder layers and final norm for decode-only steps in C."""

    def __init__(self, model: LlamaForCausalLM, block_size: int, layers: list[_Layer],
                 held: list[torch.Tensor], few_rows: list[_Layer] | None = None) -> None:
        """`few_rows`: the layers with bf16 weights as stored, for steps of at most
        `BF16_ROW_MAJOR_MAX_ROWS` decodes, where `layers` hold them packed in panels."""
        attn = model.layers[0].self_attn
        self.model = model  # keeps every tensor the descriptors point at alive
        self.held = held  # and the fp32 copies of a bf16 model's norms and biases, its panels
        self.packed_bytes = sum(t.nbytes for t in held if t.dim() == 3)  # the panels
        self.max_rows = min(MAX_ROWS[kind] for kind in _kinds(layers))
        if model.activation_dtype == torch.bfloat16 and not _kinds(layers) <= PAIR_PANELS:
            self.max_rows = min(self.max_rows, BF16_ACTIVATIONS_MAX_ROWS)
        rotary = attn.rotary
        shape = dict(hidden=model.config.hidden_size, hq=attn.num_heads, hkv=attn.num_kv_heads,
                     d=attn.head_dim, inter=model.config.intermediate_size, block_size=block_size,
                     num_layers=len(layers),
                     kv_bf16=int(attn.k_cache.dtype == torch.bfloat16), eps=model.norm.eps, scale=attn.scale,
                     cos=rotary.cos.data_ptr(), sin=rotary.sin.data_ptr(),
                     final_norm=_as_fp32(model.norm.weight, held))
        self._arrays = [(_Layer * len(ls))(*ls) for ls in (layers, few_rows) if ls is not None]
        self._decoders = [_Decoder(**shape, layers=array) for array in self._arrays]

    @classmethod
    def build(cls, model: LlamaForCausalLM, block_size: int, pack_bf16: bool | None = None
              ) -> FusedDecoder | None:
        """None unless every part of the model has a C path (fp32 or bf16 activations and
        cache, no QK-norm, no tensor parallelism, kernel-ready weights). `pack_bf16`: whether
        bf16 weights get a copy packed in panels (default: when it takes at most 1/8 of free
        memory, the rule of fp32 prepacking)."""
        if not cpu_kernels.available() or not _cpu_float(model.norm.weight):
            return None
        attn = model.layers[0].self_attn
        if attn.head_dim % 16 or model.config.hidden_size % 8:
            return None
        held: list[torch.Tensor] = []
        if pack_bf16 is None:
            pack_bf16 = layers_mod.dense_linear_bytes(model) * 8 <= available_memory_bytes()
        layers = _layers(model, held, pack_bf16)
        if layers is None:
            return None
        packed = bool(_kinds(layers) & PACKED_BF16)
        return cls(model, block_size, layers, held, _layers(model, held, False) if packed else None)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """One token per sequence: ids, positions, slots, context_lens [B], block_tables
        [B, max_blocks] (all int64) -> final normed hidden states [B, hidden]."""
        x = self.model.embed_tokens(input_ids).float().contiguous()
        out = torch.empty_like(x)
        few = len(self._decoders) > 1 and x.shape[0] <= BF16_ROW_MAJOR_MAX_ROWS
        cpu_kernels.library().decode_step(
            ctypes.addressof(self._decoders[-1] if few else self._decoders[0]), x.data_ptr(), x.shape[0],
            positions.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
            context_lens.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out.to(self.model.activation_dtype)
