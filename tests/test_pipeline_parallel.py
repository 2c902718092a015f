"""Pipeline parallelism over local worker processes joined by gloo: stages of layers with
micro-batches in flight, alone and with tensor parallelism inside each stage. Greedy parity
with transformers and with one rank; aborts while a micro-batch is in flight. Chunked prefill,
preemption, every weight format and a stage that dies: `test_tensor_parallel.py`, for both."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmscale import LLM
from llmscale.config import ConfigError, stage_layers

from .hf_reference import hf_greedy
from .test_parity import _encode
from .test_tensor_parallel import GREEDY, NUM_TOKENS, _greedy, split_llm


def pp_llm(folder: Path, **engine_args: object) -> AbstractContextManager[LLM]:
    return split_llm(folder, pipeline_parallel_size=2, kv_cache_memory="64MiB", **engine_args)


@given(st.integers(1, 96), st.integers(1, 12))
def test_stages_hold_contiguous_near_equal_layer_ranges(layers: int, stages: int) -> None:
    if stages > layers:
        return
    ranges = [stage_layers(layers, s, stages) for s in range(stages)]
    assert [i for r in ranges for i in r] == list(range(layers))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


# llama: untied lm_head on the last stage; qwen2: tied embeddings, so the last stage holds its own
# copy of the embedding matrix as its lm_head, and q/k/v biases.
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_two_stages_match_transformers_and_one_rank(kind: str, tiny_model, prompts: list[str]) -> None:
    folder = tiny_model(kind)
    ids = _encode(folder, prompts)
    one_rank = _greedy(LLM(model=str(folder), dtype="float32", kv_cache_memory="64MiB"), ids)
    with pp_llm(folder) as llm:
        engine = llm.llm_engine
        assert len(engine.model.layers) == 1 and engine.model.lm_head is None  # stage 0 of 2
        assert engine.runner.fused is None
        got = _greedy(llm, ids)
        assert not engine.pipeline.in_flight and engine.kv.num_free_blocks == engine.num_blocks
    assert got == one_rank
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


def test_two_micro_batches_are_in_flight_and_one_request_still_runs(tiny_model, prompts: list[str]) -> None:
    folder = tiny_model("llama")
    ids = _encode(folder, prompts)
    with pp_llm(folder, max_num_batched_tokens=16) as llm:
        engine = llm.llm_engine
        for i, p in enumerate(ids):
            engine.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
        engine.step()  # launched two micro-batches, finished the first
        assert len(engine.pipeline.in_flight) == 1
        flying = {r.request_id for r, _ in engine.pipeline.in_flight[0].batch.scheduled}
        assert flying == engine.scheduler.in_flight
        done: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        assert [done[str(i)] for i in range(len(ids))] == [hf_greedy(folder, p, NUM_TOKENS) for p in ids]
        assert _greedy(llm, ids[:1]) == [hf_greedy(folder, ids[0], NUM_TOKENS)]  # one micro-batch


def test_running_requests_are_shared_between_the_micro_batches(tiny_model, prompts: list[str]) -> None:
    folder = tiny_model("llama")
    ids = _encode(folder, prompts) * 2  # eight requests
    with pp_llm(folder, max_num_batched_tokens=512) as llm:
        engine = llm.llm_engine
        for i, p in enumerate(ids):
            engine.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
        engine.step()  # every prompt in one micro-batch: admission is bounded by the budget alone
        engine.step()  # then eight decodes: four in each micro-batch
        assert [len(f.batch.scheduled) for f in engine.pipeline.in_flight] == [4]
        while engine.has_unfinished_requests():
            engine.step()


def test_a_request_aborted_while_in_flight_leaves_the_others_right(tiny_model, prompts: list[str]) -> None:
    folder = tiny_model("llama")
    ids = _encode(folder, prompts[:4])
    with pp_llm(folder, max_num_batched_tokens=32) as llm:
        engine = llm.llm_engine
        for i, p in enumerate(ids):
            engine.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
        engine.step()
        victim = engine.pipeline.in_flight[0].batch.scheduled[0][0].group_id
        engine.abort_request(victim)
        done: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.request_id != victim
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        assert engine.kv.num_free_blocks == engine.num_blocks
    assert sorted(done) == sorted(str(i) for i in range(len(ids)) if str(i) != victim)
    for rid, tokens in done.items():
        assert tokens == hf_greedy(folder, ids[int(rid)], NUM_TOKENS)


def test_tensor_parallel_stages_match_transformers(tiny_model, prompts: list[str]) -> None:
    """TP=2 x PP=2, four processes: each stage splits its layer over two ranks, and the model's
    single KV head is replicated on both."""
    folder = tiny_model("llama3-rope")
    ids = _encode(folder, prompts)
    with pp_llm(folder, tensor_parallel_size=2, max_num_batched_tokens=32) as llm:
        engine = llm.llm_engine
        assert len(engine.workers.procs) == 3
        attn = engine.model.layers[0].self_attn
        assert attn.num_heads == 2 and attn.num_kv_heads == 1
        got = _greedy(llm, ids)
    for p, g in zip(ids, got, strict=True):
        assert g == hf_greedy(folder, p, NUM_TOKENS)


def test_more_stages_than_layers_is_a_one_line_error(tiny_model) -> None:
    with pytest.raises(ConfigError, match="pipeline_parallel_size 3 exceeds the model's 2 layers"):
        LLM(model=str(tiny_model("llama")), pipeline_parallel_size=3)
    with pytest.raises(ConfigError, match="pipeline_parallel_size must be >= 1"):
        LLM(model=str(tiny_model("llama")), pipeline_parallel_size=0)
