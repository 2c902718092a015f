"""The capacity planner as a library: a case whose answer is known by hand, its one-line errors,
the candidate search, the Pareto frontier and the KV cache's size per deployment."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscale.config import ConfigError
from llmscale.plan import planner
from llmscale.plan.deployment import ACTIVATION_RESERVE_BYTES, GPU_MEMORY_UTILIZATION, Deployment, ModelSpec
from llmscale.plan.hardware import get_hardware, load_catalogue
from llmscale.plan.planner import Evaluation, Latency, Slo, candidates, make_plan, pareto, replicas_needed

STEP_MS = 20.0  # every step of the made-up GPUs: nothing else in a step costs measurable time
OUTPUT_TOKENS = 8
NUM_PROMPTS = 20


def made_up_gpu(name: str, cost: float) -> dict[str, object]:
    """A GPU whose step time is its fixed overhead: bandwidth and peaks so large that a 7B
    model's weights stream in ~15 ns, no per-sequence cost."""
    return {"name": name, "kind": "gpu", "description": f"made-up {name} GPU", "memory_gib": 24,
            "memory_bandwidth_gbs": 1e9, "peak_tflops": {"bf16": 1e9}, "interconnect_gbs": 1e6,
            "network_gbs": 1e6, "devices_per_node": 1, "cost_per_hour": cost,
            "efficiency": {"compute": 1.0, "memory": 1.0, "interconnect": 1.0},
            "overhead": {"step_ms": STEP_MS, "per_seq_us": 0}}


@pytest.fixture(scope="module")
def overhead_bound(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, planner.Simulator]:
    """Two identical GPUs but for their price, and a simulator of qwen2.5-7b on 20 distinct
    32-token prompts, 8 output tokens each."""
    path = tmp_path_factory.mktemp("hw") / "hardware.yaml"
    path.write_text(yaml.safe_dump({"hardware": [made_up_gpu("dear", 5.0), made_up_gpu("cheap", 1.0)]}))
    catalogue = load_catalogue(path)
    model = ModelSpec.load("qwen2.5-7b")
    prompts = [[1000 + 50 * i + j for j in range(32)] for i in range(NUM_PROMPTS)]
    workload = planner.Workload(prompts, [OUTPUT_TOKENS] * NUM_PROMPTS)
    return catalogue, planner.Simulator(model, workload, max_model_len=256)


def test_overhead_bound_plan_is_known_by_hand(overhead_bound) -> None:
    """Each step lasts 20 ms whatever it holds, so every request's TPOT is 20 ms at any rate:
    a 30 ms target never binds, both GPUs meet it, and the cheaper one is recommended."""
    catalogue, sim = overhead_bound
    slo = Slo(tpot_p99_ms=30)
    rate = 200.0
    plan = make_plan(sim, get_hardware(catalogue, "dear,cheap"), slo, rate, formats=["bf16"])
    best = plan.recommended
    d = best.deployment
    assert d.hardware.name == "cheap" and d.weight_format == "bf16" and d.tp == 1 and d.pp == 1
    assert best.binding == "throughput"
    assert d.replicas * best.goodput >= rate
    assert best.at_target.meets(slo)
    assert best.at_target.tpot_p99_ms == pytest.approx(STEP_MS, rel=1e-4)
    assert best.cost_per_hour == pytest.approx(d.replicas * 1.0)
    assert best.cost_per_million == pytest.approx(best.cost_per_hour / (rate * OUTPUT_TOKENS * 3600) * 1e6)
    names = {e.deployment.hardware.name for e in plan.evaluations}
    assert names == {"cheap", "dear"}
    for e in plan.evaluations:
        assert e.at_target.tpot_p99_ms == pytest.approx(STEP_MS, rel=1e-4)
        price = 1.0 if e.deployment.hardware.name == "cheap" else 5.0
        assert e.cost_per_hour == pytest.approx(e.deployment.replicas * price)
    assert [e.cost_per_hour for e in plan.evaluations] == sorted(e.cost_per_hour for e in plan.evaluations)
    assert best in plan.frontier
    assert "replica(s) serve 200 req/s" in plan.why()


def test_target_below_the_step_time_names_the_lowest_tpot(overhead_bound) -> None:
    catalogue, sim = overhead_bound
    with pytest.raises(ConfigError) as info:
        make_plan(sim, get_hardware(catalogue, "dear,cheap"), Slo(tpot_p99_ms=15), 10.0, formats=["bf16"])
    msg = str(info.value)
    assert "\n" not in msg and "even at light load" in msg, msg
    lowest = float(re.search(r"lowest p99 TPOT ([\d.]+) ms", msg).group(1))  # type: ignore[union-attr]
    assert lowest == pytest.approx(STEP_MS, abs=0.05)
    relax = float(re.search(r"relax --slo to at least \S*tpot_p99_ms=([\d.]+)", msg).group(1))  # type: ignore[union-attr]
    assert STEP_MS <= relax <= STEP_MS + 0.1


def test_budget_below_the_cheapest_names_its_cost(overhead_bound) -> None:
    catalogue, sim = overhead_bound
    hardware = get_hardware(catalogue, "dear,cheap")
    with pytest.raises(ConfigError) as info:
        make_plan(sim, hardware, Slo(tpot_p99_ms=30), 10.0, budget_per_hour=0.5, formats=["bf16"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "costs $1.00/hour" in msg and "cheap" in msg and "--budget-per-hour to at least 1.00" in msg, msg
    plan = make_plan(sim, hardware, Slo(tpot_p99_ms=30), 10.0, budget_per_hour=1.0, formats=["bf16"])
    assert plan.evaluations and all(e.cost_per_hour <= 1.0 for e in plan.evaluations)
    assert plan.recommended.deployment.hardware.name == "cheap"


def test_replicas_needed_follows_the_rate(overhead_bound) -> None:
    """Four sequences at a time, each 8 steps of 20 ms: one replica completes at most
    4 / 0.16 s = 25 req/s."""
    catalogue, sim = overhead_bound
    dep = Deployment(catalogue["cheap"], "bf16", max_num_seqs=4)
    slo = Slo(ttft_p99_ms=1000, tpot_p99_ms=30)
    goodput, saturation, _, light = sim.goodput(dep, slo)
    assert light is None
    assert 0.9 * 25 <= saturation <= 25
    assert replicas_needed(sim, dep, slo, 0) == 0
    needed = [replicas_needed(sim, dep, slo, r) for r in (10, 30, 90)]
    assert needed == sorted(needed) and needed[-1] > needed[0], needed
    for n, r in zip(needed, (10, 30, 90), strict=True):
        assert n * goodput >= r
    with pytest.raises(ConfigError, match="even at light load"):
        replicas_needed(sim, dep, Slo(tpot_p99_ms=15), 10)


def test_model_too_big_for_every_entry(tmp_path: Path) -> None:
    folder = tmp_path / "giant"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 16384, "intermediate_size": 53248,
        "num_hidden_layers": 4000, "num_attention_heads": 128, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5}))
    model = ModelSpec.load(str(folder / "config.json"))
    assert model.name == "giant" and model.folder is None
    workload = planner.Workload([[1] * 16], [4])
    sim = planner.Simulator(model, workload, max_model_len=1024)
    with pytest.raises(ConfigError) as info:
        make_plan(sim, list(load_catalogue().values()), Slo(ttft_p99_ms=1000), 1.0)
    msg = str(info.value)
    assert "\n" not in msg
    assert "giant fits no catalogue entry" in msg and "more memory (--hardware FILE)" in msg, msg


def test_slo_parse() -> None:
    assert Slo.parse("ttft_p99_ms=500,tpot_p99_ms=50") == Slo(500.0, 50.0)
    only = Slo.parse(" tpot_p99_ms=40 ")
    assert only.tpot_p99_ms == 40 and math.isinf(only.ttft_p99_ms)
    slo = Slo.parse("ttft_p99_ms=250.5,tpot_p99_ms=12")
    assert Slo.parse(str(slo)) == slo


@pytest.mark.parametrize("spec", ["ttft_ms=500", "ttft_p99_ms=fast", "ttft_p99_ms=0", "tpot_p99_ms=-5",
                                  "tpot_p99_ms", "", "ttft_p99_ms=nan", ","])
def test_slo_parse_rejects(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        Slo.parse(spec)
    msg = str(info.value)
    assert msg.startswith("--slo:") and "\n" not in msg and "ttft_p99_ms, tpot_p99_ms" in msg


def test_candidates_respect_the_hardware() -> None:
    catalogue = load_catalogue()
    hardware = list(catalogue.values())
    model = ModelSpec.load("llama-3.1-70b")
    fits, rejected = candidates(hardware, model, 8192)
    assert fits
    for d in fits:
        assert d.tp <= d.hardware.devices_per_node, d.describe()
        if d.weight_format == "fp8":
            assert d.hardware.supports("fp8"), d.describe()
        if d.weight_format == "int8":
            assert not d.hardware.supports("fp8"), d.describe()  # fp8 is tried there instead
        if d.hardware.kind == "cpu":
            assert d.tp == 1 and d.pp == 1
        assert d.kv_blocks(model, 8192) > 0
    assert any(d.weight_format == "fp8" for d in fits)
    assert not any(d.hardware.name == "a100-80gb" and d.weight_format == "fp8" for d in fits)
    # 70B in bf16 is 131 GiB of weights, past one H100's 79.6 GiB: TP2 (66 GiB each) and the next up.
    h100 = [d.tp for d in fits if d.hardware.name == "h100-sxm" and d.weight_format == "bf16"]
    assert h100 == [2, 4]
    l4 = [d.tp for d in fits if d.hardware.name == "l4" and d.weight_format == "bf16"]
    assert l4 == [8]  # 16.4 GiB a device of 22.5; no TP16 on an 8-GPU node
    assert any(r.deployment.hardware.name == "h100-sxm" and r.deployment.weight_format == "bf16"
               and r.deployment.tp == 1 and "weights" in r.reason for r in rejected)
    small, _ = candidates([catalogue["h100-sxm"]], ModelSpec.load("llama-3.1-8b"), 8192, ["bf16"])
    assert [d.tp for d in small] == [1, 2]
    only_int8, _ = candidates([catalogue["h100-sxm"]], ModelSpec.load("llama-3.1-8b"), 8192, ["int8"])
    assert [d.weight_format for d in only_int8] == ["int8", "int8"]


small = st.integers(0, 4)  # few values: ties and dominance both happen often
triples = st.lists(st.tuples(small, small, small), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(points=triples)
def test_pareto_frontier(points: list[tuple[int, int, int]]) -> None:
    """Frontier members are dominated by nothing; every other evaluation by something
    (lower cost, lower p99 TTFT and higher goodput are better)."""
    dep = Deployment(load_catalogue()["l4"], "bf16")
    evals = [Evaluation(dep, float(goodput), float(goodput), "throughput",
                        Latency(float(ttft), 10.0, 1.0, 1.0), float(cost))
             for cost, ttft, goodput in points]

    def dominates(a: Evaluation, b: Evaluation) -> bool:
        ka = (a.cost_per_million, a.at_target.ttft_p99_ms, -a.goodput)
        kb = (b.cost_per_million, b.at_target.ttft_p99_ms, -b.goodput)
        pairs = list(zip(ka, kb, strict=True))
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    front = pareto(evals)
    assert [e.cost_per_million for e in front] == sorted(e.cost_per_million for e in front)
    members = {id(e) for e in front}
    assert len(members) == len(front)
    for e in evals:
        dominated = any(dominates(o, e) for o in evals)
        assert (id(e) in members) == (not dominated), (e.cost_per_million, e.at_target.ttft_p99_ms, e.goodput)


GIB = 2**30


def test_kv_blocks_by_hand() -> None:
    """llama-3.1-8b in bf16: 6.98e9 decoder weights + 2 x 525M (embedding, LM head) at 2 bytes;
    K and V of one token are 2 x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB, 2 MiB a block."""
    model = ModelSpec.load("llama-3.1-8b")
    per_layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336
    weights = 2 * (32 * per_layer + 2 * 128256 * 4096)
    block = 16 * 2 * 32 * 8 * 128 * 2
    base = load_catalogue()["h100-sxm"]

    def blocks(memory_gib: float, tp: int = 1) -> int:
        hw = replace(base, memory_bytes=memory_gib * GIB)
        return Deployment(hw, "bf16", tp=tp).kv_blocks(model, 8192)

    def expected(memory_gib: float, tp: int) -> int:
        room = memory_gib * GIB * GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_BYTES - weights / tp
        return int(room // (block / tp))

    assert blocks(40) == expected(40, 1)
    assert blocks(24) < blocks(40) < blocks(80)
    # TP2: each device holds half the weights and half of each token's K/V, so a replica's KV
    # room is twice what one device has after its reserve, less the weights once.
    for memory in (24, 40, 80):
        assert blocks(memory, 2) == expected(memory, 2)
        room = 2 * (memory * GIB * GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_BYTES) - weights
        assert abs(blocks(memory, 2) * block - room) < block
    explicit = replace(Deployment(base, "bf16", tp=2), kv_cache_bytes=10 * GIB).kv_blocks(model, 8192)
    assert explicit == 10 * GIB // block


def test_kv_blocks_errors() -> None:
    catalogue = load_catalogue()
    big = ModelSpec.load("llama-3.1-70b")
    with pytest.raises(ConfigError) as info:
        Deployment(catalogue["l4"], "bf16").kv_blocks(big, 8192)
    msg = str(info.value)
    assert "\n" not in msg
    assert "llama-3.1-70b bf16 needs" in msg and "GiB of weights per device with TP1 PP1" in msg, msg
    assert "l4 holds 22 GiB" in msg
    # Weights under the memory but nothing left for the cache after the reserve: the same error.
    tight = replace(catalogue["l4"], memory_bytes=16 * GIB)
    with pytest.raises(ConfigError, match="GiB of weights per device"):
        Deployment(tight, "bf16").kv_blocks(ModelSpec.load("llama-3.1-8b"), 8192)
    with pytest.raises(ConfigError, match="lower --max-model-len"):
        Deployment(catalogue["h100-sxm"], "bf16").kv_blocks(ModelSpec.load("llama-3.1-8b"), 10**7)


def test_fp8_kv_cache_holds_twice_the_tokens_and_reads_half_the_bytes() -> None:
    from llmscale.bench.roofline import Chunk

    model = ModelSpec.load("llama-3.1-8b")
    h100 = load_catalogue()["h100-sxm"]
    base = Deployment(h100, "fp8")
    kv8 = replace(base, kv_cache_dtype="fp8")
    assert kv8.kv_blocks(model, 4096) == pytest.approx(2 * base.kv_blocks(model, 4096), abs=1)
    decode = [Chunk(4000, 1, True)] * 64  # long contexts: K/V reads dominate the step
    assert kv8.step_model(model).step_seconds(decode) < 0.8 * base.step_model(model).step_seconds(decode)
    assert "kv-fp8" in kv8.describe()


def test_kv_cache_dtype_sets_the_bytes_per_token_on_catalogue_hardware() -> None:
    """float32 and bfloat16 are taken as asked; auto stores 16 bits where the device has bf16."""
    model = ModelSpec.load("llama-3.1-8b")
    base = Deployment(load_catalogue()["h100-sxm"], "bf16")
    fp32 = replace(base, kv_cache_dtype="float32")
    assert base.kv_elem_bytes() == replace(base, kv_cache_dtype="bfloat16").kv_elem_bytes() == 2.0
    assert fp32.kv_elem_bytes() == 4.0
    assert fp32.kv_blocks(model, 4096) == pytest.approx(base.kv_blocks(model, 4096) / 2, abs=1)
    assert "kv-fp32" in fp32.describe() and "kv-" not in base.describe()
