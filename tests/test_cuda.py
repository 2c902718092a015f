"""The engine on an NVIDIA GPU: the CUDA path (torch SDPA over gathered blocks, decodes replayed as
CUDA graphs, no C kernels) holds the same parity and bookkeeping as the CPU one.

Skipped where torch sees no GPU; a GPU machine given only this repository runs it with
`LLMSCALE_TEST_TOKENIZER` naming SmolLM2's tokenizer files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmscale import LLM, SamplingParams
from llmscale.config import EngineConfig
from llmscale.engine.llm_engine import LLMEngine

from .hf_reference import hf_greedy, hf_last_logits
from .test_parity import GREEDY, NUM_TOKENS, _encode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODES = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "chunked-prefill": {"max_num_batched_tokens": 16},
    "preemption": {"num_gpu_blocks_override": 10, "max_model_len": 128, "block_size": 16},
    "eager": {"enforce_eager": True},
}


def _cuda_llm(folder: Path, dtype: str, **engine_args) -> LLM:
    llm = LLM(model=str(folder), dtype=dtype, device="cuda", **engine_args)
    engine = llm.llm_engine
    assert engine.device.type == "cuda" and engine.runner.fused is None and not engine.runner.c_kernels
    assert all(p.device.type == "cuda" for p in engine.model.parameters())
    assert (engine.runner.graphs is None) == engine_args.get("enforce_eager", False)
    return llm


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "qwen2", "mistral"])
def test_greedy_matches_transformers_on_the_gpu(kind: str, mode: str, tiny_model, prompts: list[str]) -> None:
    """fp32 on the GPU against transformers fp32 on the same GPU, token for token, in one mixed batch."""
    folder = tiny_model(kind)
    ids = _encode(folder, prompts + [" ".join(prompts)])
    ids.append(ids[-1][:40] + ids[0])  # shares 40 tokens (two full blocks) with the long prompt
    llm = _cuda_llm(folder, "float32", kv_cache_memory="64MiB", **MODES[mode])
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY, use_tqdm=False)
    for i, (p, out) in enumerate(zip(ids, outs, strict=True)):
        assert out.outputs[0].token_ids == hf_greedy(folder, p, NUM_TOKENS, device="cuda"), f"prompt {i}"
    engine = llm.llm_engine
    if mode == "preemption":
        assert engine.scheduler.num_preemptions > 0
    if mode == "default":
        assert engine.kv.prefix_hits > 0
    if mode != "eager":  # decodes replayed captured graphs, batches padded to their buckets
        assert engine.runner.graphs is not None and len(engine.runner.graphs.graphs) > 1
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_bf16_is_as_close_to_fp32_as_transformers_bf16(tiny_model, prompts: list[str]) -> None:
    """bf16 cannot match token for token, so its error is held to transformers' own: prefill logits
    in bf16 stay as close to the fp32 reference as transformers' bf16 logits do (within 2x)."""
    folder = tiny_model("qwen2")
    ids = _encode(folder, prompts)
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(folder), dtype="bfloat16", device="cuda",
                                                kv_cache_memory="64MiB"))
    assert engine.runner.kv_dtype == torch.bfloat16
    for i, p in enumerate(ids):
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(max_tokens=1))
    result = engine.runner.execute(engine.scheduler.schedule(), engine.kv)
    assert result.logits is not None and len(result.sampled) == len(ids)
    for row, req in enumerate(result.sampled):
        exact = hf_last_logits(folder, req.prompt_token_ids, "cuda", torch.float32)
        theirs = hf_last_logits(folder, req.prompt_token_ids, "cuda", torch.bfloat16)
        ours = result.logits[row].float()
        assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3
        assert int(ours.argmax()) == int(exact.argmax())


def test_seeded_sampling_on_the_gpu_ignores_the_batch(tiny_model, prompts: list[str]) -> None:
    """A seeded request draws the same tokens alone and among requests using every sampler feature."""
    folder = tiny_model("llama")
    ids = _encode(folder, prompts)
    llm = _cuda_llm(folder, "float32", kv_cache_memory="64MiB")
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=7, max_tokens=24, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": ids[0]}], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, min_p=0.1, max_tokens=20, logprobs=3),
              SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
                             frequency_penalty=0.5, n=2, max_tokens=16),
              SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[ids[3][-1]])]
    batch = [ids[1], ids[0], ids[2], ids[3]]  # the seeded request second
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], [others[0], seeded, *others[1:]],
                        use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone
    assert len(outs[0].outputs[0].token_ids) == 20 and len(outs[0].outputs[0].logprobs) == 20
    assert len(outs[2].outputs) == 2
    assert llm.llm_engine.kv.num_free_blocks == llm.llm_engine.num_blocks
