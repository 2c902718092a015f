"""Each linear's method is chosen from its weight, the prepack decision and whether the C kernels
are built, and whichever is chosen computes torch's `F.linear` for every row band."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmscale.config import QuantConfig
from llmscale.kernels import cpu as cpu_kernels
from llmscale.model.layers import ColumnParallelLinear, RowParallelLinear
from llmscale.model.linear_method import (
    DenseCLinear,
    OneDNNPackedLinear,
    PairPanelsLinear,
    PanelsLinear,
    QuantizedCLinear,
    QuantizedTorchLinear,
    SwigluPanelsLinear,
    TorchCPULinear,
    TorchLinear,
    choose_method,
    silu_and_mul,
)
from llmscale.model.quant import pack_nibbles, quantize_int4, quantize_int8

ROWS = [1, 7, 33, 200]  # decode batches below and above the C kernels' bands, a prefill chunk
N, K = 96, 128


def _dense(bias: bool = False, feeds_swiglu: bool = False) -> ColumnParallelLinear:
    gen = torch.Generator().manual_seed(0)
    layer = ColumnParallelLinear(K, [N // 2, N // 2], bias, feeds_swiglu=feeds_swiglu)
    layer.weight.data.copy_(torch.randn(N, K, generator=gen))
    if bias:
        layer.bias.data.copy_(torch.randn(N, generator=gen))
    return layer


def _quantized(bits: int) -> tuple[RowParallelLinear, torch.Tensor]:
    """A quantized linear, prepared, and its dequantized weight."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    layer = RowParallelLinear(K, N, quant=QuantConfig(bits=bits, group_size=32))
    q = layer.quant
    if bits == 8:
        codes, scale = quantize_int8(w)
        q.qweight.data, q.scales.data = codes, scale
    else:
        codes, scale, zero = quantize_int4(w, 32)
        q.qweight.data, q.scales.data, q.zeros.data = pack_nibbles(codes), scale, zero
    q.prepare()
    return layer, q.dequantize_rows(0, N, torch.float32)


def _without_c_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)


needs_c = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels do not build here")


def test_a_layer_multiplies_with_torch_until_its_method_is_chosen() -> None:
    layer = _dense(bias=True)
    assert isinstance(layer.method, TorchLinear)
    x = torch.randn(5, K)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_c
@pytest.mark.parametrize(("prepack", "feeds_swiglu", "kind"), [
    (False, False, DenseCLinear), (True, False, PanelsLinear), (True, True, SwigluPanelsLinear),
    (False, True, DenseCLinear)])
def test_choice_with_the_c_kernels(prepack: bool, feeds_swiglu: bool, kind: type) -> None:
    layer = _dense(feeds_swiglu=feeds_swiglu)
    assert type(choose_method(layer, torch.float32, prepack)) is kind


@pytest.mark.parametrize(("prepack", "kind"), [(False, TorchCPULinear), (True, OneDNNPackedLinear)])
def test_choice_without_the_c_kernels(monkeypatch: pytest.MonkeyPatch, prepack: bool, kind: type) -> None:
    _without_c_kernels(monkeypatch)
    if prepack and not torch.backends.mkldnn.is_available():
        pytest.skip("torch has no oneDNN here")
    layer = _dense(feeds_swiglu=True)
    assert type(choose_method(layer, torch.float32, prepack)) is kind


@pytest.mark.parametrize("c_kernels", [pytest.param(True, marks=needs_c), False])
@pytest.mark.parametrize("prepack", [False, True])
@pytest.mark.parametrize("rows", ROWS)
def test_dense_methods_compute_f_linear(monkeypatch: pytest.MonkeyPatch, c_kernels: bool, prepack: bool,
                                        rows: int) -> None:
    if not c_kernels:
        _without_c_kernels(monkeypatch)
    layer = _dense(bias=True)
    layer.method = choose_method(layer, torch.float32, prepack)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)


@needs_c
@pytest.mark.parametrize("rows", ROWS)
def test_swiglu_panels_yield_the_activation(rows: int) -> None:
    layer = _dense(feeds_swiglu=True)
    layer.method = choose_method(layer, torch.float32, prepack=True)
    assert layer.method.fuses_swiglu
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    gate, up = F.linear(x, layer.weight).chunk(2, dim=-1)
    torch.testing.assert_close(layer(x), F.silu(gate) * up, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(silu_and_mul(F.linear(x, layer.weight)), F.silu(gate) * up)


@pytest.mark.skipif(not cpu_kernels.pair_panels_available(), reason="needs AVX-512 BF16")
@pytest.mark.parametrize("feeds_swiglu", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4, 33, 200, 600])
def test_bf16_pair_panels_compute_f_linear_in_fp32_sums(feeds_swiglu: bool, rows: int) -> None:
    """bf16 weights and activations, prepacked: pair panels (the row-major kernel up to three
    rows), whose fp32 sums of bf16 products, rounded once to bf16, are what
    torch's bf16 linear returns up to its own rounding; fp32 activations or no prepack keep the
    other methods."""
    layer = _dense(bias=not feeds_swiglu, feeds_swiglu=feeds_swiglu)
    layer.to(torch.bfloat16)
    assert type(choose_method(layer, torch.float32, prepack=True)) is DenseCLinear
    assert type(choose_method(layer, torch.bfloat16, prepack=False)) is DenseCLinear
    layer.method = choose_method(layer, torch.bfloat16, prepack=True)
    assert type(layer.method) is PairPanelsLinear and layer.method.fuses_swiglu == feeds_swiglu
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).bfloat16()
    want = F.linear(x.float(), layer.weight.float(), None if feeds_swiglu else layer.bias.float())
    if feeds_swiglu:
        gate, up = want.chunk(2, dim=-1)
        want = F.silu(gate) * up
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.bfloat16().float(), atol=0.05, rtol=0.02)  # a few bf16 steps


@pytest.mark.parametrize("c_kernels", [pytest.param(True, marks=needs_c), False])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", ROWS)
def test_quantized_methods_compute_f_linear_on_the_dequantized_weight(
        monkeypatch: pytest.MonkeyPatch, c_kernels: bool, bits: int, rows: int) -> None:
    if not c_kernels:
        _without_c_kernels(monkeypatch)
    layer, w = _quantized(bits)
    layer.method = choose_method(layer, torch.float32)
    assert type(layer.method) is (QuantizedCLinear if c_kernels else QuantizedTorchLinear)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    ref = F.linear(x, w)
    # Up to their rows the int kernels quantize (or round) the activations.
    torch.testing.assert_close(layer(x), ref, atol=0.02 * ref.abs().max().item(), rtol=0)


def test_dense_methods_follow_weight_changes_and_pass_gradients() -> None:
    """Training and pruning change the weights of layers whose method was chosen at load: the
    methods that read the weight see the change and let gradients through."""
    layer = _dense()
    layer.method = choose_method(layer, torch.float32)
    assert not layer.method.holds_copy
    x = torch.randn(3, K)
    with torch.no_grad():
        layer.weight.mul_(2)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), atol=1e-4, rtol=1e-5)
    layer.weight.requires_grad_(True)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(N, K))
