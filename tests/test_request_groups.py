"""A caller's request and its n samples: any id works, seeds cover torch's range, adds are atomic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmscale import SamplingParams
from llmscale.config import EngineConfig
from llmscale.engine.async_engine import AsyncLLMEngine
from llmscale.engine.llm_engine import LLMEngine
from llmscale.engine.outputs import RequestOutput

from .hf_reference import hf_greedy

NUM_TOKENS = 6
PROMPT = [1, 504, 3458, 282, 4649, 314]


def _config(folder: Path) -> EngineConfig:
    return EngineConfig.from_kwargs(model=str(folder), dtype="float32", kv_cache_memory="16MiB",
                                    max_model_len=128)


@pytest.fixture
def engine(tiny_model) -> LLMEngine:
    return LLMEngine(_config(tiny_model("llama")))


def _run(engine: LLMEngine) -> dict[str, RequestOutput]:
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step(include_unfinished=False):
            assert out.request_id not in done
            done[out.request_id] = out
    return done


def _assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert not (engine.requests or engine.groups or engine.group_prompts or engine.detokenizers)
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_ids_containing_hash_finish(engine: LLMEngine, tiny_model) -> None:
    """'a#0' alone and 'a' with two samples are different requests, whatever ids they had inside."""
    wanted = {"a#1": 1, "a": 2, "a#0": 1, "b#2": 2, "#": 1}
    for rid, n in wanted.items():
        engine.add_request(rid, {"prompt_token_ids": PROMPT}, SamplingParams(
            n=n, temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True))
    done = _run(engine)
    expected = hf_greedy(tiny_model("llama"), PROMPT, NUM_TOKENS)
    assert set(done) == set(wanted)
    for rid, out in done.items():
        assert out.finished
        assert [o.index for o in out.outputs] == list(range(wanted[rid]))
        assert all(o.token_ids == expected for o in out.outputs)
    _assert_idle(engine)


def test_async_ids_containing_hash_finish(tiny_model) -> None:
    folder = tiny_model("llama")
    engine = AsyncLLMEngine(LLMEngine(_config(folder), stream_text=True, online=True))

    async def last(rid: str, n: int) -> RequestOutput:
        params = SamplingParams(n=n, temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
        return [o async for o in engine.generate({"prompt_token_ids": PROMPT}, params, request_id=rid)][-1]

    async def main() -> list[RequestOutput]:
        runs = asyncio.gather(last("a#1", 1), last("a", 2), last("b#2", 2))
        return await asyncio.wait_for(runs, timeout=30)  # a lost output must fail, not hang

    try:
        outs = asyncio.run(main())
    finally:
        engine.shutdown()
    expected = hf_greedy(folder, PROMPT, NUM_TOKENS)
    assert [o.request_id for o in outs] == ["a#1", "a", "b#2"]
    assert [len(o.outputs) for o in outs] == [1, 2, 2]
    assert all(o.finished and c.token_ids == expected for o in outs for c in o.outputs)


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1])
def test_seed_outside_torch_range_is_rejected(seed: int) -> None:
    with pytest.raises(ValueError, match=rf"seed must be in \[-{2**63}, {2**64 - 1}\], got {seed}"):
        SamplingParams(seed=seed)


def test_samples_of_the_top_seed_wrap_around(engine: LLMEngine) -> None:
    """Sample i is seeded seed + i, wrapped past 2**64 - 1: sample 1 of the top seed is seed 0."""
    def sampled(seed: int, n: int) -> list[list[int]]:
        params = SamplingParams(n=n, seed=seed, temperature=1.0, max_tokens=NUM_TOKENS, ignore_eos=True)
        engine.add_request("r", {"prompt_token_ids": PROMPT}, params)
        return [o.token_ids for o in _run(engine)["r"].outputs]

    both = sampled(2**64 - 1, 2)
    assert [len(t) for t in both] == [NUM_TOKENS, NUM_TOKENS]
    assert both == sampled(2**64 - 1, 1) + sampled(0, 1)
    assert sampled(-2**63, 2) == sampled(-2**63, 1) + sampled(-2**63 + 1, 1)
    _assert_idle(engine)


def test_failed_add_queues_none_of_its_samples(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while building the second sample leaves nothing of the request behind."""
    import llmscale.engine.llm_engine as llm_engine

    built = []
    real = llm_engine.IncrementalDetokenizer

    def second_fails(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        built.append(None)
        if len(built) == 2:
            raise RuntimeError("detokenizer failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(llm_engine, "IncrementalDetokenizer", second_fails)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=NUM_TOKENS, stop=["never"])
    with pytest.raises(RuntimeError, match="detokenizer failed"):
        engine.add_request("x", {"prompt_token_ids": PROMPT}, params)
    _assert_idle(engine)
    monkeypatch.undo()
    engine.add_request("x", {"prompt_token_ids": PROMPT}, params)  # the id is free again
    assert len(_run(engine)["x"].outputs) == 2

