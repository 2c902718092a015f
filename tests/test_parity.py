"""Greedy output equals Hugging Face transformers token for token, under every engine mode."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llmscale import LLM, SamplingParams
from llmscale.config import DTYPES, ConfigError, EngineConfig, activation_dtype
from llmscale.engine.llm_engine import LLMEngine
from llmscale.kernels import cpu as cpu_kernels
from llmscale.model import linear_method

from .conftest import TOKENIZER_FILES
from .divergence import assert_parts_only_at_near_ties
from .hf_reference import hf_all_logits, hf_greedy, hf_last_logits

NUM_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


def _generate(folder: Path, prompts: list, **engine_args) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=str(folder), dtype="float32", **engine_args)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def _encode(folder: Path, prompts: list[str]) -> list[list[int]]:
    from llmscale.model.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    return [tok.encode(p) for p in prompts]


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "qwen2", "mistral", "qwen3"])
def test_tiny_models_match_transformers(kind: str, tiny_model, prompts: list[str]) -> None:
    folder = tiny_model(kind)
    ids = _encode(folder, prompts)
    llm, got = _generate(folder, [{"prompt_token_ids": p} for p in ids], kv_cache_memory="64MiB")
    # Decode steps ran every layer in one C call wherever the kernels build (it has no QK-norm).
    fusable = cpu_kernels.available() and not llm.llm_engine.model_config.qk_norm
    assert (llm.llm_engine.runner.fused is not None) == fusable
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


def test_sliding_window_model_matches_transformers_within_its_window(tiny_model, prompts: list[str]) -> None:
    folder = tiny_model("mistral-window")  # window 32
    ids = _encode(folder, prompts[:1])[0]
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory="16MiB", max_model_len=32)
    until_full = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    got = llm.generate([{"prompt_token_ids": ids}], until_full, use_tqdm=False)[0].outputs[0].token_ids
    assert len(ids) + len(got) == 32
    assert got == hf_greedy(folder, ids, len(got))


@pytest.fixture
def torch_kernels_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The engine as it runs where llmscale's C kernels cannot build: torch ops only."""
    monkeypatch.setenv("LLMSCALE_CPU_KERNELS", "0")
    cpu_kernels.library.cache_clear()
    yield
    monkeypatch.delenv("LLMSCALE_CPU_KERNELS")
    cpu_kernels.library.cache_clear()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_torch_fallback_matches_transformers(kind: str, tiny_model, prompts: list[str],
                                             torch_kernels_only: None) -> None:
    folder = tiny_model(kind)
    ids = _encode(folder, prompts)
    llm, got = _generate(folder, [{"prompt_token_ids": p} for p in ids], kv_cache_memory="64MiB",
                         max_num_batched_tokens=16)  # chunked prefill with context, mixed steps
    assert llm.llm_engine.runner.fused is None and not llm.llm_engine.runner.c_kernels
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


def test_padded_decode_buffers_match_transformers(tiny_model, prompts: list[str],
                                                  torch_kernels_only: None) -> None:
    """Decodes padded into CUDA-graph buckets (here run eagerly: `capture=False`): padded rows
    write only the scratch block and never change the real rows' tokens."""
    folder = tiny_model("llama")
    ids = _encode(folder, prompts + [" ".join(prompts)])
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB", block_size=4, max_model_len=256)
    runner = llm.llm_engine.runner
    runner.use_decode_graphs(max_num_seqs=8, max_model_len=256, capture=False)
    params = [SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS - 4 * i, ignore_eos=True)
              for i in range(len(ids))]  # requests finish at different steps: batches of 5 down to 1
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    for p, out in zip(ids, outs, strict=True):
        n = len(out.outputs[0].token_ids)
        assert out.outputs[0].token_ids == hf_greedy(folder, p, NUM_TOKENS)[:n]
    assert runner.graphs is not None
    buckets = set(runner.graphs.inputs)
    assert {b for b, _ in buckets} >= {8, 4, 2, 1} and len({w for _, w in buckets}) > 1
    assert llm.llm_engine.kv.num_free_blocks == llm.llm_engine.num_blocks


@pytest.fixture(scope="module")
def bf16_llama(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its weights rounded to bf16, saved as a bf16 checkpoint."""
    import transformers

    src = tiny_model("llama")
    folder = tmp_path_factory.mktemp("tiny-llama-bf16")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


@pytest.mark.parametrize("budget", [None, 16])
def test_bf16_weights_compute_in_fp32_where_the_cpu_has_no_bf16(bf16_llama: Path, prompts: list[str],
                                                                budget: int | None) -> None:
    """On such a CPU `--dtype bfloat16` stores the weights in bf16 and computes in fp32, so it
    equals transformers in fp32 on the same bf16-valued weights token for token: through the
    per-op path (many-row prefills cast the weight, few rows take the C kernel) and the fused
    decode path."""
    if activation_dtype(torch.bfloat16, torch.device("cpu")) != torch.float32:
        pytest.skip("this CPU multiplies bf16 natively: activations stay bf16")
    ids = _encode(bf16_llama, prompts + [" ".join(prompts)])
    assert sum(map(len, ids)) > linear_method.MIXED_C_KERNEL_MAX_ROWS  # the first step casts
    llm = LLM(model=str(bf16_llama), dtype="bfloat16", kv_cache_memory="64MiB",
              max_num_batched_tokens=budget)
    model, runner = llm.llm_engine.model, llm.llm_engine.runner
    assert model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.norm.weight.dtype == torch.float32 and runner.kv_dtype == torch.float32
    assert (runner.fused is not None) == cpu_kernels.available()
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY,
                                                        use_tqdm=False)]
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(bf16_llama, p, NUM_TOKENS)


def test_bf16_attention_in_c_matches_the_gathered_sdpa_path(smollm_folder: Path, prompts: list[str]) -> None:
    """Where the CPU multiplies bf16, activations and the KV cache are bf16, and attention runs
    the C kernels in fp32: rotary with the cache write, prefill attention (q, k and v widened;
    with AVX-512 BF16, bf16 products summed in fp32, as torch's bf16 attention rounds them),
    decodes reading the cache in place. Against torch's path (bf16 rotary, SDPA over gathered
    blocks) on the same engine, over prompts of very different lengths with chunked prefill: the
    same greedy tokens, except where the two orders of summation meet a near-tie: a top-2
    logprob gap of at most 0.25, two steps of bf16 at these logits (16-32; ties of 0 occur).
    torch's path rounds q, k, the scores' inputs and the output to bf16 where C keeps fp32."""
    if activation_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32:
        pytest.skip("this CPU computes bf16 weights in fp32: the cache is fp32")
    if not cpu_kernels.available():
        pytest.skip("the C kernels do not build on this machine")
    ids = _encode(smollm_folder, prompts + [" ".join(prompts * 6)])
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    runs = []
    for in_c in (True, False):
        llm = LLM(model=str(smollm_folder), dtype="bfloat16", kv_cache_memory="128MiB", max_model_len=1024,
                  max_num_batched_tokens=64)
        runner = llm.llm_engine.runner
        assert runner.kv_dtype == torch.bfloat16 and runner.decode_in_place and runner.c_kernels
        assert runner.attention_bf16_dots == cpu_kernels.pair_panels_available()
        runner.decode_in_place = runner.c_kernels = in_c
        runner.fused = None  # both through the model's modules (the fused step: test_cpu_kernels)
        runs.append([o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in ids], params,
                                                        use_tqdm=False)])
    assert_parts_only_at_near_ties(runs[0], [o.token_ids for o in runs[1]], max_gap=0.25)


@pytest.mark.parametrize("dtype, kv_cache_dtype", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_kv_cache_in_another_dtype_parts_only_at_near_ties(dtype: str, kv_cache_dtype: str,
                                                          smollm_folder: Path, prompts: list[str]) -> None:
    """`--kv-cache-dtype` stores K/V apart from the activations' dtype, and either mix runs every C
    path: the fused decode step, rotary with the cache write, the prefill kernel over cached
    tokens (under chunked prefill), the in-place decodes. Against the same model with its cache
    in the activations' dtype: the same greedy tokens but at near-ties (bf16 rounds K/V to 8 bits
    of mantissa), and twice (half) the blocks in the same memory."""
    if dtype == "bfloat16" and activation_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32:
        pytest.skip("this CPU computes bf16 weights in fp32")
    ids = _encode(smollm_folder, prompts + [" ".join(prompts * 6)])
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    runs, blocks = [], []
    for kv in ("auto", kv_cache_dtype):
        llm = LLM(model=str(smollm_folder), dtype=dtype, kv_cache_memory="128MiB", max_model_len=1024,
                  max_num_batched_tokens=64, kv_cache_dtype=kv)
        runner = llm.llm_engine.runner
        assert runner.kv_dtype == (activation_dtype(DTYPES[dtype], torch.device("cpu")) if kv == "auto"
                                   else DTYPES[kv])
        assert runner.model.layers[0].self_attn.k_cache.dtype == runner.kv_dtype
        if kv != "auto" and cpu_kernels.available():
            assert runner.decode_in_place and runner.c_kernels and runner.fused is not None
        blocks.append(llm.llm_engine.num_blocks)
        runs.append([o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in ids], params,
                                                        use_tqdm=False)])
    assert blocks[1] == (blocks[0] * 2 if kv_cache_dtype == "bfloat16" else blocks[0] // 2)
    assert_parts_only_at_near_ties(runs[0], [o.token_ids for o in runs[1]], max_gap=0.125)


def test_fp8_kv_cache_is_refused_before_loading() -> None:
    with pytest.raises(ConfigError, match="fp8 is for planning catalogue hardware"):
        LLM(kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="unknown kv_cache_dtype 'fp16'"):
        LLM(kv_cache_dtype="fp16")


@pytest.fixture(scope="module")
def smollm_case(smollm_folder: Path) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of varied lengths (two share a long prefix) and their reference continuations."""
    base = [
        "The capital of France is",
        "Write a short poem about the ocean.",
        "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n",
        ("In the beginning of the nineteenth century the town was a quiet place, with narrow streets "
         "and small houses, and the river that ran through it carried boats of timber and grain "
         "down to the sea. The people who lived there"),
    ]
    ids = _encode(smollm_folder, base)
    ids.append(ids[3] + ids[0])  # shares a 40+ token prefix with prompt 3
    return ids, [hf_greedy(smollm_folder, p, NUM_TOKENS) for p in ids]


MODES = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "chunked-prefill": {"max_num_batched_tokens": 16},
    "preemption": {"num_gpu_blocks_override": 10, "max_model_len": 128, "block_size": 16},
    "static": {"batching": "static", "static_batch_size": 2},
    "dynamic": {"batching": "dynamic"},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_smollm_matches_transformers(mode: str, smollm_folder: Path, smollm_case) -> None:
    ids, expected = smollm_case
    args = {"kv_cache_memory": "256MiB", "max_model_len": 2048, **MODES[mode]}
    llm, got = _generate(smollm_folder, [{"prompt_token_ids": p} for p in ids], **args)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"prompt {i} diverged in mode {mode}"
    engine = llm.llm_engine
    if mode == "preemption":
        assert engine.scheduler.num_preemptions > 0
    if mode == "chunked-prefill":
        assert max(len(p) for p in ids) > 16
    # Every block is back in the pool once all requests are done.
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_prefix_cache_reuse_keeps_parity(smollm_folder: Path, smollm_case) -> None:
    ids, expected = smollm_case
    llm = LLM(model=str(smollm_folder), dtype="float32", kv_cache_memory="256MiB", max_model_len=2048)
    prompts = [{"prompt_token_ids": p} for p in ids]
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    hits_before = llm.llm_engine.kv.prefix_hits
    second = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.llm_engine.kv.prefix_hits > hits_before
    assert any(o.metrics.num_cached_tokens > 0 for o in second)
    for a, b, e in zip(first, second, expected, strict=True):
        assert a.outputs[0].token_ids == e
        assert b.outputs[0].token_ids == e


def test_prefill_logits_match_transformers(smollm_folder: Path, smollm_case) -> None:
    ids, _ = smollm_case
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(smollm_folder), dtype="float32",
                                                kv_cache_memory="128MiB", max_model_len=2048))
    for i, p in enumerate(ids):
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(max_tokens=1))
    batch = engine.scheduler.schedule()
    assert len(batch.scheduled) == len(ids)
    result = engine.runner.execute(batch, engine.kv)
    logits = result.logits
    for row, req in enumerate(result.sampled):
        ref = hf_last_logits(smollm_folder, req.prompt_token_ids)
        # fp32 end to end: differences are summation-order noise only.
        torch.testing.assert_close(logits[row], ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("engine_args", [
    dict(), dict(max_num_batched_tokens=16),
    dict(num_gpu_blocks_override=16, max_num_batched_tokens=64, max_model_len=64)],
    ids=["one-step", "chunked", "preempted"])
def test_prompt_logprobs_match_transformers(tiny_model, prompts: list[str], engine_args: dict) -> None:
    """Prompt logprobs equal log-softmax of transformers' logits at every prompt position, also
    when the prompt is split into chunks or recomputed after a preemption."""
    folder = tiny_model("llama")
    ids = _encode(folder, prompts)
    engine_args.setdefault("max_model_len", 256)
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB", block_size=4, **engine_args)
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0, prompt_logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    if "num_gpu_blocks_override" in engine_args:
        assert sum(o.metrics.num_preemptions for o in outs) > 0
    for p, out in zip(ids, outs, strict=True):
        ref = torch.log_softmax(hf_all_logits(folder, p), dim=-1)
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(p) and got[0] is None
        for i in range(1, len(p)):
            entry = got[i]
            assert p[i] in entry and len(entry) <= 4
            assert entry[p[i]] == pytest.approx(float(ref[i - 1, p[i]]), abs=1e-4)
            best = int(ref[i - 1].argmax())
            assert entry[best] == pytest.approx(float(ref[i - 1, best]), abs=1e-4)
