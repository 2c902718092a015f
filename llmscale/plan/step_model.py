"""How long one engine step takes, from what it schedules: the performance model.

A step is a list of `Chunk`s (tokens already cached, tokens computed now, whether it samples),
exactly what the scheduler hands the runner. Its time on one device is

    t = step_s + per_seq_s * sequences + per_sample_s * sampled rows
        + max(body weight bytes / weight_bandwidth, body FLOPs / linear_flops)    decoder linears
        + max(LM head bytes / weight_bandwidth, LM head FLOPs / linear_flops)     if a row samples
        + attention FLOPs * attention_s_per_flop + K/V bytes read * kv_s_per_byte
        + tensor-parallel all-reduces (2 per layer) over the interconnect
        + pipeline stages' hidden states over the network

The linears are a roofline: streaming the weights bounds small batches, the GEMMs' FLOPs
bound large ones, and the knee sits where the two meet. The coefficients are physical (bytes/s,
FLOP/s, seconds), so one set fitted on this machine (`plan/calibrate.py`) also predicts other
models here, and a catalogue entry's peaks times its efficiencies predict a machine not here.

For the model it was measured on, the calibration also keeps `CurveModel`: the engine picks
kernels by row count (`model/linear_method.py`'s bands, the panel GEMMs' prefetch up to 64 rows,
their row tiles), so its linears' time is a curve with steps that no two-parameter roofline
follows. The curve is piecewise linear over the step's token count, with a knot at every
measured count; attention is split by phase (a decode reads its context, a prefill chunk
computes its causal pairs).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from llmscale.bench.roofline import Chunk
from llmscale.config import ConfigError, ModelConfig

# Bytes per weight, with the quantized formats' scales: int8 keeps one fp32 scale per output
# row (negligible), int4 one fp16 scale and zero per 32-weight group.
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
# The dtype a format computes in on hardware that has it (int4 and int8 weights feed int8 or
# bf16 units; what matters for the roofline is the peak that applies).
COMPUTE_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp16": "bf16", "fp8": "fp8", "int8": "int8", "int4": "int8"}
ALLREDUCE_LATENCY_S = 10e-6  # one small all-reduce's fixed cost over NVLink-class links (assumed)
SEND_LATENCY_S = 20e-6  # one point-to-point send between nodes over RDMA (assumed)


@dataclass(frozen=True)
class Coefficients:
    """What a device achieves on this engine's steps. Seconds, bytes/s and FLOP/s."""

    step_s: float  # fixed cost of a step: scheduling, launching, Python
    per_seq_s: float  # per scheduled sequence: batch building, metadata
    per_sample_s: float  # per sampled row: sampling, detokenizing, output objects
    weight_bandwidth: float  # bytes/s at which weights stream through the linears
    linear_flops: float  # FLOP/s of the linears once compute-bound
    attention_s_per_flop: float
    kv_s_per_byte: float
    interconnect_bandwidth: float = 0.0  # bytes/s between tensor-parallel ranks (0: none)
    network_bandwidth: float = 0.0  # bytes/s between pipeline stages, one per node (0: none)

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, float]) -> Coefficients:
        try:
            return cls(**{k: float(v) for k, v in data.items()})
        except TypeError as e:
            raise ConfigError(f"calibration coefficients: {e}") from None


@dataclass(frozen=True)
class Geometry:
    """What one device of a (tensor x pipeline)-parallel group holds and computes per token."""

    body_bytes: float  # decoder weights read per step
    body_flops_per_token: float
    head_bytes: float  # LM head weights, read when any row samples
    head_flops_per_row: float
    attention_flops_per_pair: float  # per (query, key) pair, all layers on this device
    kv_bytes_per_token: float  # K and V of one token, all layers on this device
    allreduce_bytes_per_token: float  # activations all-reduced per token (0 without TP)
    allreduces_per_step: int
    tp: int = 1
    pp: int = 1
    hidden_bytes_per_token: float = 0.0  # what one stage hands the next, per token

    @classmethod
    def of(cls, cfg: ModelConfig, weight_format: str, kv_elem_bytes: float, act_elem_bytes: float = 2.0,
           tp: int = 1, pp: int = 1) -> Geometry:
        """Dense-architecture counts (bench/roofline.py's) split over `tp` ranks and `pp` stages.
        Pipeline stages run one after another, so a step's time is the sum over stages: a
        stage holds 1/pp of the layers, and the step's work per device is the whole model's."""
        if weight_format not in WEIGHT_BYTES:
            raise ConfigError(f"unknown weight format {weight_format!r}; choose {', '.join(WEIGHT_BYTES)}")
        h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
        body_params = layers * per_layer
        head_params = cfg.vocab_size * h
        wb = WEIGHT_BYTES[weight_format]
        kv_heads = max(1, cfg.num_key_value_heads // tp)  # fewer KV heads than ranks: replicated
        return cls(body_bytes=body_params * wb / tp, body_flops_per_token=2 * body_params / tp,
                   head_bytes=head_params * wb / tp, head_flops_per_row=2 * head_params / tp,
                   attention_flops_per_pair=4 * layers * cfg.num_attention_heads * d / tp,
                   kv_bytes_per_token=2 * layers * kv_heads * d * kv_elem_bytes,
                   allreduce_bytes_per_token=(2 * layers * h * act_elem_bytes) if tp > 1 else 0.0,
                   allreduces_per_step=2 * layers if tp > 1 else 0, tp=tp, pp=pp,
                   hidden_bytes_per_token=h * act_elem_bytes)

    def weight_bytes_per_device(self) -> float:
        """Weights one device holds: its tensor shard of its pipeline stage's layers."""
        return (self.body_bytes + 2 * self.head_bytes) / self.pp  # embedding + LM head


@dataclass(frozen=True)
class Features:
    """What a step's time depends on, counted from its chunks."""

    seqs: int
    sampled: int
    tokens: int
    attention_pairs: int  # (query, key) pairs, causal
    kv_tokens_read: int  # cached + new tokens whose K/V each layer reads

    @classmethod
    def of(cls, chunks: Sequence[Chunk]) -> Features:
        return cls(seqs=len(chunks), sampled=sum(1 for c in chunks if c.samples),
                   tokens=sum(c.new for c in chunks),
                   attention_pairs=sum(c.new * c.context + c.new * (c.new + 1) // 2 for c in chunks),
                   kv_tokens_read=sum(c.context + c.new for c in chunks))


def linear_seconds(f: Features, g: Geometry, weight_bandwidth: float, linear_flops: float) -> float:
    """The roofline of the decoder linears and (when a row samples) the LM head."""
    body = max(g.body_bytes / weight_bandwidth, f.tokens * g.body_flops_per_token / linear_flops)
    if not f.sampled:
        return body
    return body + max(g.head_bytes / weight_bandwidth, f.sampled * g.head_flops_per_row / linear_flops)


def linear_terms(f: Features, g: Geometry) -> list[float]:
    """The terms whose coefficients are fitted by least squares, in `Coefficients` order."""
    return [1.0, float(f.seqs), float(f.sampled), f.attention_pairs * g.attention_flops_per_pair,
            f.kv_tokens_read * g.kv_bytes_per_token]


@dataclass(frozen=True)
class StepTimeModel:
    coefficients: Coefficients
    geometry: Geometry

    def features_seconds(self, f: Features) -> float:
        c, g = self.coefficients, self.geometry
        fixed = c.step_s + c.per_seq_s * f.seqs + c.per_sample_s * f.sampled
        compute = linear_seconds(f, g, c.weight_bandwidth, c.linear_flops)
        attention = (f.attention_pairs * g.attention_flops_per_pair * c.attention_s_per_flop
                     + f.kv_tokens_read * g.kv_bytes_per_token * c.kv_s_per_byte)
        comm = 0.0
        if g.tp > 1 and c.interconnect_bandwidth > 0:
            # Ring all-reduce: each rank sends and receives 2 (tp - 1) / tp of the data.
            volume = f.tokens * g.allreduce_bytes_per_token * 2 * (g.tp - 1) / g.tp
            comm = volume / c.interconnect_bandwidth + g.allreduces_per_step * ALLREDUCE_LATENCY_S
        if g.pp > 1 and c.network_bandwidth > 0:
            # A micro-batch passes the stages in turn, each handing on its hidden states (the
            # simulator overlaps micro-batches: plan/simulator.py).
            comm += (g.pp - 1) * (f.tokens * g.hidden_bytes_per_token / c.network_bandwidth + SEND_LATENCY_S)
        return fixed + compute + attention + comm

    def step_seconds(self, chunks: Sequence[Chunk]) -> float:
        return self.features_seconds(Features.of(chunks)) if chunks else 0.0


class StepModel(Protocol):
    def step_seconds(self, chunks: Sequence[Chunk]) -> float: ...


def curve_terms(chunks: Sequence[Chunk], knots: Sequence[int]) -> list[float]:
    """CurveModel's fitted terms: decodes, prefill chunks, decode context tokens (summed; their
    square, since past the caches reading more K/V costs more per token; and padded to the
    longest, which is what attention over a padded batch of gathered blocks reads, as torch's
    SDPA path does where the C decode kernel does not run), prefill causal
    pairs, then the token count's interpolation weights on the knots (linear extrapolation past
    the last one)."""
    contexts = [c.context + 1 for c in chunks if c.new == 1]
    decode_ctx = sum(contexts)
    prefill_pairs = sum(c.new * c.context + c.new * (c.new + 1) // 2 for c in chunks if c.new > 1)
    terms = [float(len(contexts)), float(sum(1 for c in chunks if c.new > 1)), float(decode_ctx),
             decode_ctx ** 2 / 1e4, float(len(contexts) * max(contexts, default=0)), float(prefill_pairs)]
    weights = [0.0] * len(knots)
    tokens = sum(c.new for c in chunks)
    i = min(max(bisect.bisect_right(knots, tokens) - 1, 0), len(knots) - 2)
    a = (tokens - knots[i]) / (knots[i + 1] - knots[i])
    weights[i], weights[i + 1] = 1.0 - a, a
    return terms + weights


@dataclass(frozen=True)
class CurveModel:
    """Measured step time of one model and dtype on one machine (see the module docstring)."""

    knots: tuple[int, ...]  # token counts, increasing, at least two
    coefficients: tuple[float, ...]  # one per curve_terms entry

    def step_seconds(self, chunks: Sequence[Chunk]) -> float:
        if not chunks:
            return 0.0
        terms = curve_terms(chunks, self.knots)
        return max(0.0, sum(c * t for c, t in zip(self.coefficients, terms, strict=True)))
