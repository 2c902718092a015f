"""llmscale's C CPU kernels against torch's math on the same inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscale import LLM, SamplingParams, config
from llmscale.compress.quantize import quantize_model
from llmscale.config import ConfigError, activation_dtype, cpu_flags, flags_at_isa
from llmscale.engine.fused_decode import (
    BF16_ACTIVATIONS_MAX_ROWS,
    DENSE_BF16,
    PAIR_PANELS_BF16,
    PANELS_BF16,
    PANELS_SWIGLU_F32,
    FusedDecoder,
)
from llmscale.kernels import cpu
from llmscale.model.quant import dequantize_int4, dequantize_int8, pack_nibbles, quantize_int4, quantize_int8

from .divergence import assert_parts_only_at_near_ties

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C kernels do not build on this machine")
NATIVE_FLAGS = frozenset(config._cpuinfo().get("flags", "").split())
HAS_AVX512 = "avx512f" in NATIVE_FLAGS

SHAPES = [(96, 64), (160, 576), (40, 1536)]
ROWS = [1, 3, 8, 11, 17]


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def test_the_build_follows_the_cpu_flags() -> None:
    """AVX-512 matmuls where the (possibly capped) flags have avx512f, AVX2 otherwise: under
    LLMSCALE_CPU_ISA=avx2 this file runs again on the AVX2 build (the test below)."""
    assert cpu.vector_bits() == (512 if "avx512f" in cpu_flags() else 256)
    assert cpu.pair_panels_available() == ({"avx512f", "avx512_bf16"} <= cpu_flags())
    assert ("-mno-avx512f" in cpu.compile_flags(cpu_flags())) == ("avx512f" not in cpu_flags())


def test_a_forced_isa_drops_the_flags_above_it() -> None:
    flags = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16",
                       "amx_tile", "amx_bf16"})
    assert flags_at_isa(flags, "native") == flags
    assert flags_at_isa(flags, "avx512") == flags - {"amx_tile", "amx_bf16"}
    assert flags_at_isa(flags, "avx2") == {"sse4_2", "avx", "avx2", "fma", "f16c"}
    assert flags_at_isa(flags, "none") == {"sse4_2", "avx", "f16c"}
    assert flags_at_isa(frozenset({"avx2", "fma"}), "avx512") == {"avx2", "fma"}  # caps, never adds


def test_an_unknown_cpu_isa_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSCALE_CPU_ISA", "avx1024")
    config.cpu_isa.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"^LLMSCALE_CPU_ISA=avx1024: expected one of native, avx512, "
                                              r"avx2, none$"):
            config.cpu_flags()
    finally:
        monkeypatch.undo()
        config.cpu_isa.cache_clear()
    assert config.cpu_isa() in config.CPU_ISA_LEVELS


@pytest.mark.skipif(not HAS_AVX512 or "LLMSCALE_CPU_ISA" in os.environ,
                    reason="needs an AVX-512 CPU, and runs once (not under its own override)")
def test_the_avx2_kernels_match_torch_under_the_override() -> None:
    """An AVX-512 machine tests its AVX2 kernels too: the kernel tests of this file again, in a
    process whose LLMSCALE_CPU_ISA=avx2 builds the library with -mno-avx512f."""
    tests = "build_follows or dense or panel or swiglu or paged_decode or prefill_attention"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", tests], env={**os.environ, "LLMSCALE_CPU_ISA": "avx2"}, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


GREEDY = """
import json, sys
from llmscale import LLM, SamplingParams
from llmscale.kernels import cpu
from llmscale.serve.banner import cpu_kernels_path
llm = LLM(model=sys.argv[1], dtype="float32", kv_cache_memory="32MiB")
outs = llm.generate(["The capital of France is", "1, 2, 3, 4,"],
                    SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
print(json.dumps({"available": cpu.available(), "banner": cpu_kernels_path(),
                  "fused": llm.llm_engine.runner.fused is not None,
                  "tokens": [o.outputs[0].token_ids for o in outs]}))
"""


def test_without_kernels_a_model_generates_the_same_greedy_tokens(tiny_model) -> None:
    """LLMSCALE_CPU_ISA=none: no C kernels (as on a CPU without AVX2 or a compiler), every
    caller on its torch path, and the same greedy tokens as with them."""
    folder = str(tiny_model("llama"))
    runs = {}
    for isa in ("native", "none"):
        proc = subprocess.run([sys.executable, "-c", GREEDY, folder],
                              env={**os.environ, "LLMSCALE_CPU_ISA": isa}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[isa] = json.loads(proc.stdout.splitlines()[-1])
    assert runs["native"]["available"] and runs["native"]["fused"]
    assert not runs["none"]["available"] and not runs["none"]["fused"]
    assert "off by LLMSCALE_CPU_ISA=none" in runs["none"]["banner"]
    assert "LLMSCALE_CPU_ISA" not in runs["native"]["banner"]
    assert runs["none"]["tokens"] == runs["native"]["tokens"]


@pytest.mark.parametrize("n,k", [*SHAPES, (24, 40), (24, 56)])  # k % 32 == 8, 24: the AVX-512 tails
@pytest.mark.parametrize("m", ROWS)
def test_dense_matmul(n: int, k: int, m: int) -> None:
    torch.manual_seed(m)
    x, w = torch.randn(m, k), torch.randn(n, k)
    torch.testing.assert_close(cpu.matmul_dense(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
    wb = w.bfloat16()
    torch.testing.assert_close(cpu.matmul_dense(x, wb), x @ wb.float().t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,k", [*SHAPES, (49, 100), (49, 300), (7, 3)])  # a padded last panel, any k
@pytest.mark.parametrize("m", [*ROWS, 6, 12, 130, 400])  # whole and partial 6-row tiles and row blocks
def test_panel_matmul(n: int, k: int, m: int) -> None:
    torch.manual_seed(m)
    x, w = torch.randn(m, k), torch.randn(n, k)
    packed = cpu.pack_panels(w)
    assert cpu.is_panels(packed) and packed.shape == (-(-n // cpu.PANEL), k, cpu.PANEL)
    torch.testing.assert_close(cpu.matmul_panels(x, packed, n), x @ w.t(), rtol=1e-5, atol=1e-4)
    # bf16 weights stay bf16 in their panels, widened as they load: the product of their values.
    half = w.to(torch.bfloat16)
    packed = cpu.pack_panels(half)
    assert packed.dtype == torch.bfloat16 and packed.shape == (-(-n // cpu.PANEL), k, cpu.PANEL)
    torch.testing.assert_close(cpu.matmul_panels(x, packed, n), x @ half.float().t(), rtol=1e-5, atol=1e-4)
    swiglu = cpu.matmul_swiglu_panels(x, cpu.pack_swiglu_panels(half[:n // 16 * 16]))
    if n >= 16:
        gate_up = cpu.matmul_panels(x, cpu.pack_panels(half[:n // 16 * 16]), n // 16 * 16)
        assert torch.equal(swiglu, cpu.silu_and_mul(gate_up))


@pytest.mark.skipif(not cpu.pair_panels_available(), reason="needs AVX-512 BF16")
@pytest.mark.parametrize("n,k", [(32, 2), (96, 64), (160, 576), (64, 1536), (32, 302)])
@pytest.mark.parametrize("m", [*ROWS, 6, 12, 65, 130, 400])  # k-blocks up to 64 rows, row blocks past 384
def test_bf16_pair_matmul_is_the_product_of_bf16_rounded_activations(n: int, k: int, m: int) -> None:
    """Pair panels round the activations to bf16 (to nearest even) and sum the products of
    each pair along k in fp32: torch's product of the same bf16 values, to fp32 precision; packed
    for SwiGLU, bit for bit `silu_and_mul` of that product."""
    torch.manual_seed(m)
    x, w = torch.randn(m, k), torch.randn(n, k).bfloat16()
    packed = cpu.pack_pair_panels(cpu.pack_panels(w))
    assert packed.dtype == torch.bfloat16 and packed.shape == (n // cpu.PANEL, k // 2, 2 * cpu.PANEL)
    product = cpu.matmul_pair_panels(x, packed, n)
    torch.testing.assert_close(product, x.bfloat16().float() @ w.float().t(), rtol=1e-5, atol=1e-4)
    swiglu_packed = cpu.pack_pair_panels(cpu.pack_swiglu_panels(w))
    fused = cpu.matmul_pair_panels(x, swiglu_packed, n, swiglu=True)
    assert torch.equal(fused, cpu.silu_and_mul(product))
    # bf16 in and out: the same sums, rounded as torch rounds them, for fp32 and bf16 activations.
    for xs in (x, x.bfloat16()):
        rounded = cpu.matmul_pair_panels(xs, packed, n, out_dtype=torch.bfloat16)
        assert torch.equal(rounded, product.bfloat16())
    fused_bf16 = cpu.matmul_pair_panels(x.bfloat16(), swiglu_packed, n, swiglu=True, out_dtype=torch.bfloat16)
    assert torch.equal(fused_bf16, fused.bfloat16())


@pytest.mark.parametrize("n,k", [(49, 300), (96, 1536)])
def test_panel_matmul_rows_do_not_depend_on_the_batch(n: int, k: int) -> None:
    """Decode-sized batches multiply in k-blocks, larger ones over whole k, and a batch's rows
    split into tiles of near-equal sizes (33 rows: 7, 7, 7, 6, 6): a row's result is bit for bit
    the same whatever the batch (batch composition never changes a greedy token)."""
    torch.manual_seed(n)
    w = torch.randn(n, k)
    x, packed = torch.randn(200, k), cpu.pack_panels(w)
    whole = cpu.matmul_panels(x, packed, n)
    for rows in (1, 5, 8, 9, 33, 64):
        assert torch.equal(cpu.matmul_panels(x[:rows], packed, n), whole[:rows])
    if cpu.pair_panels_available() and n % 32 == 0:
        pairs = cpu.pack_pair_panels(cpu.pack_panels(w.bfloat16()))
        whole = cpu.matmul_pair_panels(x, pairs, n)
        for rows in (1, 5, 8, 9, 33, 64):
            assert torch.equal(cpu.matmul_pair_panels(x[:rows], pairs, n), whole[:rows])


@pytest.mark.parametrize("i,k", [(8, 64), (96, 576), (40, 1536)])  # one panel to many
@pytest.mark.parametrize("m", [*ROWS, 130, 400])
def test_swiglu_panel_matmul_fuses_silu_and_mul_exactly(i: int, k: int, m: int) -> None:
    torch.manual_seed(m)
    x, w = torch.randn(m, k), torch.randn(2 * i, k)  # gate rows, then up rows
    fused = cpu.matmul_swiglu_panels(x, cpu.pack_swiglu_panels(w))
    gate_up = cpu.matmul_panels(x, cpu.pack_panels(w), 2 * i)
    assert torch.equal(fused, cpu.silu_and_mul(gate_up))
    gate, up = gate_up.chunk(2, dim=1)
    torch.testing.assert_close(fused, F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_int8_matmul_matches_dequantized_weights(n: int, k: int, m: int) -> None:
    torch.manual_seed(m)
    x, w = torch.randn(m, k), torch.randn(n, k)
    q, s = quantize_int8(w)
    # Activations are quantized to int8 per 32 values: ~0.3% error on random data.
    assert _relative_error(cpu.matmul_int8(x, q, s), x @ dequantize_int8(q, s).t()) < 0.01


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("m", ROWS)
def test_int4_matmul_matches_dequantized_weights(group: int, m: int) -> None:
    torch.manual_seed(m)
    n, k = 72, 576
    x, w = torch.randn(m, k), torch.randn(n, k) + 0.3  # an offset exercises the zero points
    codes, s, z = quantize_int4(w, group)
    y = cpu.matmul_int4(x, pack_nibbles(codes), s, z, group)
    assert _relative_error(y, x @ dequantize_int4(codes, s, z).t()) < 0.01


@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_kernels_match_torch(group: int) -> None:
    torch.manual_seed(group)
    w = torch.randn(40, 256) + 0.3
    q, s = quantize_int8(w)
    torch.testing.assert_close(cpu.dequant_int8(q, s, torch.empty(40, 256)), dequantize_int8(q, s))
    codes, s4, z4 = quantize_int4(w, group)
    # rows 8..20 of the packed weight: a slice, as the chunked dequantization passes them
    out = cpu.dequant_int4(pack_nibbles(codes)[8:20], s4[8:20], z4[8:20], group, torch.empty(12, 256))
    torch.testing.assert_close(out, dequantize_int4(codes, s4, z4)[8:20])


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), width=st.integers(1, 70), seed=st.integers(0, 2 ** 16),
       specials=st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf"), 2.0]), max_size=4))
def test_argmax_is_torchs(rows: int, width: int, seed: int, specials: list[float]) -> None:
    """The first of equal values wins, and a NaN beats every number, as in torch.argmax: values
    drawn from a few integers tie often, and the specials land anywhere, tails included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (rows, width), generator=g).float()
    for value in specials:
        x.view(-1)[torch.randint(0, rows * width, (1,), generator=g)] = value
    assert torch.equal(cpu.argmax(x), x.argmax(dim=-1))


def test_argmax_of_vocabulary_wide_logits() -> None:
    x = torch.randn(36, 49152)
    assert torch.equal(cpu.argmax(x), x.argmax(dim=-1))


@pytest.mark.parametrize("m", [1, 5])
def test_rms_norm_with_and_without_residual(m: int) -> None:
    x, r, w = torch.randn(m, 576), torch.randn(m, 576), torch.randn(576)
    out, total = cpu.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, F.rms_norm(x, (576,), w, 1e-5))
    assert total is x
    out, total = cpu.rms_norm(x, w, 1e-5, residual=r)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(out, F.rms_norm(x + r, (576,), w, 1e-5))


@pytest.mark.parametrize("m", [1, 7, 300])  # 300: rows split over the threads
def test_bf16_rms_norm_rounds_where_torch_rounds(m: int) -> None:
    """bf16 rows: the residual sum bit for bit torch's bf16 add, and the output torch's bf16
    RMSNorm (transformers' order of roundings) but for a last-bit step where the sum of squares,
    added in another order, lands a value on the other side of a rounding boundary."""
    from llmscale.model.layers import RMSNorm

    torch.manual_seed(m)
    norm = RMSNorm(576, 1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(576).bfloat16()
    x, r = (3 * torch.randn(m, 576)).bfloat16(), torch.randn(m, 576).bfloat16()
    out, total = cpu.rms_norm(x, norm.weight, norm.eps, residual=r)
    assert torch.equal(total, x + r)
    with torch.no_grad():
        want = norm.weight * (total.float() * torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True)
                                                          + norm.eps)).bfloat16()
    assert out.dtype == torch.bfloat16 and (out != want).float().mean() < 0.01
    torch.testing.assert_close(out, want, rtol=2 ** -7, atol=0)  # one bf16 step
    assert torch.equal(cpu.rms_norm(x, norm.weight, norm.eps)[0],
                       cpu.rms_norm(x, norm.weight, norm.eps, residual=torch.zeros_like(x))[0])


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (8, 1, 128), (8, 2, 48), (6, 3, 64)])
@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_matches_sdpa(hq: int, hkv: int, d: int, block_size: int,
                                             cache_dtype: torch.dtype) -> None:
    """Query-head groups of 1-8 (tiles of up to 3 heads), head dims in whole and half 32-wide
    tiles, blocks scattered over the cache, and cache rows past each context holding NaN; a
    bf16 cache is read as it is and summed in fp32, so it matches fp32 SDPA over its values."""
    torch.manual_seed(hq + d + block_size)
    lens = [1, 17, 150, 300]  # a partial first block, block boundaries, long enough for threads
    needs = [-(-n // block_size) for n in lens]
    num_blocks = sum(needs) + 3
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    v_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    tables = torch.zeros(len(lens), max(needs), dtype=torch.long)
    perm = torch.randperm(num_blocks).tolist()  # each sequence's own blocks, scattered
    for i, (n, need) in enumerate(zip(lens, needs, strict=True)):
        tables[i, :need] = torch.tensor(perm[:need])
        perm = perm[need:]
        rows = torch.arange(n)
        k_cache[tables[i][rows // block_size], rows % block_size] = torch.randn(n, hkv, d)
        v_cache[tables[i][rows // block_size], rows % block_size] = torch.randn(n, hkv, d)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    q = torch.randn(len(lens), hq, d)
    out = cpu.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens), d ** -0.5)
    k_cache, v_cache = k_cache.float(), v_cache.float()
    for i, n in enumerate(lens):
        k = k_cache[tables[i]].reshape(-1, hkv, d)[:n].transpose(0, 1)  # [Hkv, n, D]
        v = v_cache[tables[i]].reshape(-1, hkv, d)[:n].transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, enable_gqa=True)  # [Hq, 1, D]
        torch.testing.assert_close(out[i], ref.squeeze(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
@pytest.mark.parametrize("n,context", [(1, 0), (5, 0), (48, 0), (49, 0), (300, 0), (17, 16), (37, 263)])
def test_prefill_attention_matches_sdpa(hq: int, hkv: int, d: int, n: int, context: int) -> None:
    """Causal attention of a chunk after `context` earlier tokens, its q/k/v strided views of one
    fused projection as in the model: partial 6-row tiles, 48-row tasks and 16-key panels."""
    torch.manual_seed(n + context)
    length = context + n
    qkv = torch.randn(length, (hq + 2 * hkv) * d)
    q = qkv[context:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(length, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(length, hkv, d)
    out = cpu.prefill_attention(q, k, v, d ** -0.5)
    mask = torch.arange(length)[None, :] <= torch.arange(context, length)[:, None]  # [n, length]
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, enable_gqa=True)  # [Hq, n, D]
    torch.testing.assert_close(out, ref.transpose(0, 1), rtol=1e-4, atol=1e-5)
    if cpu.pair_panels_available() and d % 32 == 0:
        # bf16 products: q * scale, K, the probabilities and V rounded to bf16, fp32 sums.
        dots = cpu.prefill_attention(q, k, v, d ** -0.5, bf16_dots=True)
        rounded = [t.bfloat16().float().transpose(0, 1) for t in (q * d ** -0.5, k, v)]
        qr, kr, vr = rounded[0], *(t.repeat_interleave(hq // hkv, dim=0) for t in rounded[1:])
        probs = torch.softmax((qr @ kr.transpose(1, 2)).masked_fill(~mask, -torch.inf), dim=-1)
        want = (probs.bfloat16().float() @ vr).transpose(0, 1)
        # A probability at a rounding boundary may round the other way: one bf16 step of it.
        torch.testing.assert_close(dots, want, rtol=1e-3, atol=1e-3)
        # bf16 K and V, read in place from a packed bf16 qkv: the same values, rounded alike.
        qkv16 = qkv.bfloat16()
        k16 = qkv16[:, hq * d:(hq + hkv) * d].view(length, hkv, d)
        v16 = qkv16[:, (hq + hkv) * d:].view(length, hkv, d)
        assert torch.equal(cpu.prefill_attention(q, k16, v16, d ** -0.5, bf16_dots=True), dots)


@pytest.fixture(scope="module")
def tiny_variants(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tiny_model("llama")
    out = {"fp32": folder}
    for method in ("int8", "int4"):
        out[method] = tmp_path_factory.mktemp(f"tiny-{method}")
        quantize_model(str(folder), method, 32, out[method], show_progress=False)
    out["qwen2"] = tiny_model("qwen2")  # QKV bias
    return out


@pytest.mark.parametrize("variant", ["fp32", "panels", "int8", "int4", "qwen2"])
def test_fused_decode_step_matches_the_per_op_path(variant: str, tiny_variants: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-only steps run all layers in one C call; the same requests through the model's
    modules give the same tokens and logprobs."""
    panels = variant == "panels"  # fp32 weights prepacked in panels, else row-major
    llm = LLM(model=str(tiny_variants["fp32" if panels else variant]), dtype="float32",
              kv_cache_memory="32MiB", prepack_weights=panels)
    runner = llm.llm_engine.runner
    assert runner.fused is not None
    if panels:  # the gate-up GEMM yields the SwiGLU activation itself
        assert runner.fused._arrays[0][0].gate_up.kind == PANELS_SWIGLU_F32
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived",
               "1, 2, 3, 4,"]
    if variant in ("fp32", "panels"):  # past one pass of the C matmuls' rows, up to the
        # row-major path's limit; panels take any batch
        prompts += [f"Item {i} of the list is" for i in range(min(runner.fused.max_rows, 70) - len(prompts))]
    batch_sizes: list[int] = []
    call = FusedDecoder.__call__

    def counted(self: FusedDecoder, input_ids: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        batch_sizes.append(len(input_ids))
        return call(self, input_ids, *args)

    monkeypatch.setattr(FusedDecoder, "__call__", counted)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=1)
    fused = llm.generate(prompts, params, use_tqdm=False)
    assert max(batch_sizes) == len(prompts)
    runner.fused = None
    per_op = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(fused, per_op, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        out_a, out_b = a.outputs[0], b.outputs[0]
        for la, lb, tok in zip(out_a.logprobs, out_b.logprobs, out_a.token_ids, strict=True):
            assert la[tok] == pytest.approx(lb[tok], abs=1e-3)


def test_rotary_writes_a_bf16_cache_rounded_as_torch_rounds() -> None:
    """The same K/V written to an fp32 and a bf16 cache: the bf16 one holds the fp32 values
    rounded to nearest even, bit for bit as `Tensor.to(torch.bfloat16)`."""
    gen = torch.Generator().manual_seed(0)
    t, hq, hkv, d, blocks = 5, 4, 2, 16, 4
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen) * 3
    angles = torch.randn(64, d, generator=gen)
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    positions, slots = torch.tensor([0, 3, 9, 17, 40]), torch.tensor([2, 7, 8, 30, 63])
    caches = {dt: [torch.zeros(blocks, 16, hkv, d, dtype=dt) for _ in range(2)]
              for dt in (torch.float32, torch.bfloat16)}
    outs = {dt: cpu.rope_and_cache(qkv, hq, hkv, cos, sin, positions, slots, *caches[dt]) for dt in caches}
    for full, half in zip(caches[torch.float32], caches[torch.bfloat16], strict=True):
        assert torch.equal(full.to(torch.bfloat16), half) and full.abs().sum() > 0
    for a, b in zip(outs[torch.float32], outs[torch.bfloat16], strict=True):
        assert torch.equal(a, b)  # q and k come back in fp32 either way


def test_rotary_reads_a_bf16_qkv_as_its_fp32_widening() -> None:
    gen = torch.Generator().manual_seed(1)
    t, hq, hkv, d = 130, 4, 2, 32  # 130 rows: split over the threads
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, generator=gen) * 3).bfloat16()
    angles = torch.randn(256, d, generator=gen)
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    positions, slots = torch.randperm(256, generator=gen)[:t], torch.randperm(16 * 16, generator=gen)[:t]
    results = []
    for x in (qkv, qkv.float()):
        caches = [torch.zeros(16, 16, hkv, d, dtype=torch.bfloat16) for _ in range(2)]
        results.append([*cpu.rope_and_cache(x, hq, hkv, cos, sin, positions, slots, *caches), *caches])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(activation_dtype(torch.bfloat16, torch.device("cpu")) != torch.bfloat16,
                    reason="needs a CPU with bf16 arithmetic")
def test_a_bf16_model_decodes_in_one_c_call_as_its_per_op_path_does(tiny_model) -> None:
    """A bf16 model's decode-only steps run every layer in C, activations in fp32 between its
    ops where the per-op path rounds them to bf16 after each: the two part only at near-ties
    (a few bf16 steps of the top-2 logprob gap), and their logprobs agree to bf16's precision."""
    llm = LLM(model=str(tiny_model("llama")), dtype="bfloat16", kv_cache_memory="32MiB")
    runner = llm.llm_engine.runner
    fused_decoder = runner.fused
    assert fused_decoder is not None and runner.kv_dtype == torch.bfloat16
    # Weights packed in panels (multiplied in bf16 pairs where the CPU can: then at any batch),
    # and as stored for a few decodes: steps of 3 and of 9 take each.
    pairs = cpu.pair_panels_available()
    assert fused_decoder.max_rows == (1 << 20 if pairs else BF16_ACTIVATIONS_MAX_ROWS)
    assert [a[0].down.kind for a in fused_decoder._arrays] == [PAIR_PANELS_BF16 if pairs else PANELS_BF16,
                                                               DENSE_BF16]
    base = ["The capital of France is", "Once upon a time, in a land far away, there lived", "1, 2, 3, 4,"]
    prompts = base + [f"Item {i} of the list is" for i in range(6)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2)
    fused = [o.outputs[0] for few in (base, prompts) for o in llm.generate(few, params, use_tqdm=False)]
    runner.fused = None
    per_op = [o.outputs[0] for few in (base, prompts) for o in llm.generate(few, params, use_tqdm=False)]
    assert_parts_only_at_near_ties(per_op, [o.token_ids for o in fused], max_gap=0.125)
    for a, b in zip(fused, per_op, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y),
                    len(a.token_ids))
        for i in range(same):
            assert a.logprobs[i][a.token_ids[i]] == pytest.approx(b.logprobs[i][b.token_ids[i]], abs=0.1)


def test_bf16_decodes_read_the_cache_in_place_as_the_gathered_sdpa_path_does() -> None:
    """A bf16 batch of decodes over contexts of very different lengths: reading each sequence's
    blocks in place gives what the padded gather + masked SDPA path gives, to bf16's precision."""
    from llmscale.model.attention import AttentionMetadata, paged_attention

    torch.manual_seed(0)
    hq, hkv, d, bs = 9, 3, 64, 16
    lens = [3, 40, 700, 129, 16]
    needs = [-(-n // bs) for n in lens]
    num_blocks = sum(needs) + 2
    k_cache = torch.randn(num_blocks, bs, hkv, d).bfloat16()
    v_cache = torch.randn(num_blocks, bs, hkv, d).bfloat16()
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(lens), max(needs), dtype=torch.long)
    for i, need in enumerate(needs):
        tables[i, :need] = torch.tensor(perm[:need])
        perm = perm[need:]
    q = torch.randn(len(lens), hq, d).bfloat16()
    k = v = torch.zeros(len(lens), hkv, d, dtype=torch.bfloat16)  # already in the cache
    context = torch.tensor(lens)
    width = tables.shape[1] * bs
    mask = torch.zeros(len(lens), width, dtype=torch.bfloat16)
    mask.masked_fill_(torch.arange(width)[None, :] >= context[:, None], float("-inf"))
    common = {"slot_mapping": torch.empty(0), "num_decode_tokens": len(lens), "decode_block_tables": tables}
    gathered = paged_attention(q, k, v, k_cache, v_cache,
                               AttentionMetadata(decode_mask=mask.view(len(lens), 1, 1, width), **common),
                               d ** -0.5)
    in_place = paged_attention(q, k, v, k_cache, v_cache,
                               AttentionMetadata(decode_in_place=True, decode_context_lens=context, **common),
                               d ** -0.5)
    assert in_place.dtype == torch.bfloat16
    torch.testing.assert_close(in_place.float(), gathered.float(), rtol=2e-2, atol=2e-2)
