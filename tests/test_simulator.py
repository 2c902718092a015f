"""The simulator against the engine it models, and the performance model's fit.

The differential test runs one random workload (shared prefixes, arrivals at random steps,
a KV cache small enough to preempt) through the real `LLMEngine` with a tiny model and through
`SimEngine`, and requires the same batches, step by step: which requests, how many tokens,
and who was preempted."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmscale.bench.roofline import Chunk
from llmscale.config import ConfigError, EngineConfig, SchedulerConfig
from llmscale.engine.block_pool import BlockPool
from llmscale.engine.llm_engine import LLMEngine
from llmscale.engine.sampling_params import SamplingParams
from llmscale.plan.calibrate import Sample, age, fit, fit_curve, nnls
from llmscale.plan.simulator import RequestOverhead, SimEngine, SimWorkload, make_router, simulate
from llmscale.plan.step_model import Coefficients, CurveModel, Geometry, StepTimeModel


class FixedStep:
    """A step model with a constant time: the differential test compares decisions, not time."""

    def step_seconds(self, chunks: list[Chunk]) -> float:
        return 0.01 if chunks else 0.0


def record_batches(engine: LLMEngine | SimEngine) -> list[list[tuple[str, int]]]:
    """Wrap the engine's scheduler so every batch it schedules is recorded."""
    log: list[list[tuple[str, int]]] = []
    schedule = engine.scheduler.schedule

    def recording() -> object:
        batch = schedule()
        log.append([(r.request_id, n) for r, n in batch.scheduled] + [(f"preempted:{r.request_id}", 0)
                                                                       for r in batch.preempted])
        return batch

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    return log


def workload(seed: int, vocab: int = 5000) -> list[tuple[int, list[int], int]]:
    """(arrival step, prompt ids, max tokens): prompts share a few prefixes."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(10, vocab) for _ in range(rng.choice([16, 40, 64]))] for _ in range(3)]
    out = []
    step = 0
    for _ in range(rng.randint(6, 14)):
        step += rng.choice([0, 0, 1, 3, 7])
        prefix = rng.choice(prefixes) if rng.random() < 0.7 else []
        prompt = prefix + [rng.randrange(10, vocab) for _ in range(rng.randint(1, 90))]
        out.append((step, prompt, rng.randint(1, 24)))
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([16, 48, 256]),
       blocks=st.sampled_from([24, 40, 400]), max_seqs=st.sampled_from([2, 8]), caching=st.booleans())
def test_simulator_schedules_exactly_as_the_engine(tiny_model, seed: int, budget: int, blocks: int,
                                                   max_seqs: int, caching: bool) -> None:
    engine, sim = engine_and_simulator(tiny_model("llama"), blocks, budget, max_seqs, caching=caching)
    in_lockstep(engine, sim, seed)
    assert engine.kv.prefix_hits == sim.kv.prefix_hits


@pytest.mark.parametrize("seed", [3, 11])
def test_pipelined_simulator_schedules_exactly_as_the_pipelined_engine(tiny_model, seed: int) -> None:
    """Two pipeline stages: the engine keeps two micro-batches in flight, and so must the
    simulator, with the same requests in each and the same preemptions."""
    engine, sim = engine_and_simulator(tiny_model("llama"), 40, 48, 8, stages=2)
    try:
        real = in_lockstep(engine, sim, seed)
        assert not sim.flights
        assert any(len(b) and len(a) for a, b in zip(real, real[1:], strict=False))  # two in flight at once
    finally:
        engine.shutdown()


def engine_and_simulator(folder: Path, blocks: int, budget: int, max_seqs: int, caching: bool = True,
                         stages: int = 1) -> tuple[LLMEngine, SimEngine]:
    config = EngineConfig.from_kwargs(model=str(folder), dtype="float32", max_model_len=256,
                                      num_gpu_blocks_override=blocks, block_size=16,
                                      max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                                      enable_prefix_caching=caching, pipeline_parallel_size=stages)
    engine = LLMEngine(config)
    sched = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return engine, SimEngine(sched, blocks, 16, caching, engine.max_model_len, FixedStep(), stages=stages)


def in_lockstep(engine: LLMEngine, sim: SimEngine, seed: int) -> list[list[tuple[str, int]]]:
    """The same workload through both, step for step; every batch either schedules must match
    (which requests, how many tokens, who was preempted). Returns the batches."""
    real, simulated = record_batches(engine), record_batches(sim)
    pending = workload(seed)
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, prompt, max_tokens = pending.pop(0)
            rid = f"r{step}-{len(pending)}"
            engine.add_request(rid, {"prompt_token_ids": prompt},
                               SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            sim.add_request(rid, prompt, max_tokens)
        engine.step()
        sim.step()
        step += 1
        assert real == simulated, f"step {step}: engine {real[-1]} vs simulator {simulated[-1]}"
    assert not sim.has_unfinished_requests()
    return real


class LinearStep:
    """10 ms a step plus 1 ms a token computed."""

    def step_seconds(self, chunks: list[Chunk]) -> float:
        return 0.01 + 0.001 * sum(c.new for c in chunks) if chunks else 0.0


def linear_engine() -> SimEngine:
    return SimEngine(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=8), 100, 16, True, 1024,
                     LinearStep())


def test_simulated_run_times_follow_the_step_model() -> None:
    """One request alone: TTFT is its prefill step, each later token one decode step."""
    work = SimWorkload([[5] * 100], [10], [0.0])
    run = simulate(linear_engine, 1, work, make_router("prefix"), "t", 1.0, 1.0, 0,
                   request_overhead=RequestOverhead(0.002, 0.5))
    r = run.requests[0]
    assert r.success and r.output_tokens == 10
    assert r.ttft_s == pytest.approx(0.002 + 0.11)
    assert r.itl_s == pytest.approx([0.011] * 9)
    assert r.e2e_s == pytest.approx(0.002 + 0.11 + 9 * 0.011)


def test_a_request_reaching_a_busy_engine_pays_the_busy_overhead() -> None:
    """The second request is sent while the first's prefill step runs: it reaches the engine
    after the busy overhead, waits for that step to end, then prefills beside the decode."""
    work = SimWorkload([[5] * 100, [7] * 50], [10, 10], [0.0, 0.05])
    run = simulate(linear_engine, 1, work, make_router("prefix"), "t", 1.0, 1.0, 0,
                   request_overhead=RequestOverhead(0.002, 0.08))
    first, second = run.requests
    # The first prefill runs 0.002-0.112, then its decodes (0.011 each). The second, sent at
    # 0.05, reaches the engine at 0.13 (0.002 later had it been idle), during the decode of
    # 0.123-0.134, and prefills beside the next decode: a step of 0.01 + 0.001 * 51.
    assert first.ttft_s == pytest.approx(0.112)
    assert second.ttft_s == pytest.approx(0.134 + 0.061 - 0.05)


def test_pipeline_stages_overlap_micro_batches() -> None:
    """Eight decoding requests over two stages run as two micro-batches of four in flight at
    once: the run ends sooner than with one batch in flight, while one request alone gains
    nothing (its micro-batch passes the stages in turn)."""
    class PerToken:  # 1 ms a token: a micro-batch of half the requests takes half the time
        def step_seconds(self, chunks: list[Chunk]) -> float:
            return 0.001 * sum(c.new for c in chunks)

    def run(stages: int, n: int) -> float:
        def make() -> SimEngine:
            return SimEngine(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=8), 200, 16, True, 1024,
                             PerToken(), stages=stages)
        work = SimWorkload([[i + 5] * 10 for i in range(n)], [40] * n, [0.0] * n)
        done = simulate(make, 1, work, make_router("prefix"), "t", 1.0, 1.0, 0)
        assert all(r.success and r.output_tokens == 40 for r in done.requests)
        return done.duration_s

    # The 80 prompt tokens prefill in one micro-batch (80 ms either way); then two micro-batches
    # of 4 decodes take 4 ms a token where one batch of 8 took 8.
    assert run(1, 8) == pytest.approx(0.080 + 39 * 0.008)
    assert run(2, 8) == pytest.approx(0.080 + 39 * 0.004, abs=0.005)
    assert run(2, 1) == pytest.approx(run(1, 1))


def test_replicas_share_the_load() -> None:
    """Two replicas behind a load-aware router finish a burst sooner than one."""
    sched = SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=4)

    def make() -> SimEngine:
        return SimEngine(sched, 400, 16, True, 1024, FixedStep())

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 900) for _ in range(50)] for _ in range(16)]
    work = SimWorkload(prompts, [20] * 16, [0.0] * 16)
    one = simulate(make, 1, work, make_router("pow2"), "one", math.inf, 1.0, 0)
    two = simulate(make, 2, work, make_router("pow2"), "two", math.inf, 1.0, 0)
    assert all(r.success for r in one.requests + two.requests)
    assert two.duration_s < 0.75 * one.duration_s


def test_nnls_recovers_non_negative_coefficients() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, size=(40, 5))
    x = np.array([0.5, 0.0, 2.0, 0.0, 1.0])
    got = nnls(a, a @ x)
    assert np.allclose(got, x, atol=1e-8)
    assert (nnls(a, -a @ x) >= 0).all()


def synthetic_samples(model: object, shapes: list[tuple[Chunk, ...]]) -> list[Sample]:
    return [Sample(s, model.step_seconds(list(s))) for s in shapes]  # type: ignore[attr-defined]


SHAPES = ([tuple(Chunk(ctx, 1, True) for _ in range(b))
           for ctx in (32, 256, 1024) for b in (1, 2, 4, 8, 16, 32, 64)]
          + [(Chunk(off, n, True),) for off in (0, 512) for n in (8, 32, 64, 128, 256, 512, 1024)]
          + [tuple(Chunk(256, 1, True) for _ in range(b)) + (Chunk(0, n, True),)
             for b in (1, 8) for n in (64, 256)]
          + [(Chunk(1024, 1, True),) + tuple(Chunk(32, 1, True) for _ in range(b - 1)) for b in (4, 16, 64)])


def test_roofline_fit_recovers_known_coefficients() -> None:
    g = Geometry(body_bytes=4e8, body_flops_per_token=4e8, head_bytes=1e8, head_flops_per_row=1e8,
                 attention_flops_per_pair=1e5, kv_bytes_per_token=4e4, allreduce_bytes_per_token=0.0,
                 allreduces_per_step=0)
    truth = Coefficients(step_s=0.004, per_seq_s=2e-4, per_sample_s=0.0, weight_bandwidth=5e10,
                         linear_flops=4e11, attention_s_per_flop=3e-12, kv_s_per_byte=2e-11)
    samples = synthetic_samples(StepTimeModel(truth, g), SHAPES)
    got = fit(samples, g, peak_bandwidth=5e10, peak_flops=1e12)
    assert got.max_abs_error < 0.01
    c = got.coefficients
    assert c.linear_flops == pytest.approx(truth.linear_flops, rel=0.02)
    assert c.step_s == pytest.approx(truth.step_s, rel=0.05)
    assert c.per_seq_s == pytest.approx(truth.per_seq_s, rel=0.1)


def test_curve_fit_recovers_a_known_curve() -> None:
    knots = tuple(sorted({sum(c.new for c in s) for s in SHAPES}))
    rng = np.random.default_rng(1)
    coefficients = (2e-4, 1e-3, 3e-7, 1e-8, 5e-8, 2e-9) + tuple(np.sort(rng.uniform(0.01, 0.5, len(knots))))
    truth = CurveModel(knots, coefficients)
    model, errors = fit_curve(synthetic_samples(truth, SHAPES))
    assert max(abs(e) for e in errors) < 1e-6
    for shape in SHAPES:
        assert model.step_seconds(list(shape)) == pytest.approx(truth.step_seconds(list(shape)), rel=1e-6)


def test_the_servers_handoff_slows_the_next_step_unless_the_engine_idles() -> None:
    """A step that gives a request its first token or finishes it hands the server work that runs
    beside the next step; an engine idle meanwhile feels only what is left of it."""
    from llmscale.plan.simulator import Handoff

    engine = SimEngine(SchedulerConfig(max_num_batched_tokens=256), 64, 16, False, 256, FixedStep(),
                       handoff=Handoff(0.002, 0.003))

    def step() -> float:
        launched = engine.launch()
        engine.now = launched.ends_s
        engine.end_step()
        return launched.seconds

    engine.add_request("a", list(range(10, 18)), max_tokens=2)
    assert step() == pytest.approx(0.010)  # the prefill, which gives the first token
    assert step() == pytest.approx(0.012)  # beside the first token's handoff; it finishes the request
    engine.now += 0.001  # idle for a third of the finish's handoff
    engine.add_request("b", list(range(20, 28)), max_tokens=2)
    assert step() == pytest.approx(0.012)


def test_served_terms_recover_the_costs_the_simulator_charges() -> None:
    """The serving calibration's fit over a served load's logged steps recovers the step terms and
    the handoff that produced them, here a simulated server's with known costs."""
    from llmscale.plan.serving import LoggedStep, Served, ServingOverhead, served_terms

    truth = ServingOverhead(0.0003, 0.00006, 0.0012, 0.0008, request_s=0.0, busy_request_s=0.0)
    # 0.4 ms per decode, 2 us per context token read, 10 ns per prefill pair, 4 ms a step.
    curve = CurveModel((1, 4096), (0.0004, 0.0, 2e-6, 0.0, 0.0, 1e-8, 0.004, 0.004))
    engine = SimEngine(SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=32), 2000, 16, False, 2048,
                       Served(curve, truth), handoff=truth.handoff())
    rng = random.Random(0)
    logged = []
    for i in range(400):
        if rng.random() < 0.2:
            prompt = [rng.randrange(10, 5000) for _ in range(rng.randint(20, 300))]
            engine.add_request(str(i), prompt, max_tokens=rng.randint(4, 60))
        if not engine.has_unfinished_requests():
            continue
        launched = engine.launch()
        chunks = tuple(Chunk(*shape) for shape in launched.batch.shapes())
        engine.now = launched.ends_s
        engine.end_step()
        logged.append(LoggedStep(launched.ends_s, launched.seconds, chunks))
    fitted = served_terms(logged, curve.step_seconds)
    for name in ("step_s", "per_token_s", "first_token_s", "finished_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name


def test_served_terms_need_enough_steps() -> None:
    from llmscale.plan.serving import LoggedStep, served_terms

    steps = [LoggedStep.parse(f"[{0.01 * (k + 1)}, 0.01, [[40, 1, true]]]") for k in range(10)]
    with pytest.raises(ConfigError, match="too few to fit"):
        served_terms(steps, FixedStep().step_seconds)


def test_a_fresh_server_pays_each_prefill_token_count_once() -> None:
    """`Served` adds `FirstRun` to the first step of each token count that holds a prefill chunk
    (oneDNN builds its primitives per row count), never to decode-only steps (the fused C step),
    and keeps what it has seen for every engine made from it: one server over a sweep's rates."""
    from llmscale.plan.serving import FirstRun, Served, ServingOverhead

    flat = CurveModel((1, 4096), (0.0,) * 6 + (0.01, 0.01))  # 10 ms a step whatever it holds
    served = Served(flat, ServingOverhead(0.0, 0.0, 0.0, 0.0, 0.0, 0.0), FirstRun(0.002, 1e-5))
    prefill = [Chunk(0, 100, True)]
    mixed = [Chunk(40, 1, True)] * 3 + [Chunk(0, 97, True)]  # 100 tokens too: the same GEMM rows
    decodes = [Chunk(40, 1, True)] * 100
    assert served.step_seconds(prefill) == pytest.approx(0.010 + 0.002 + 0.001)
    assert served.step_seconds(prefill) == pytest.approx(0.010)
    assert served.step_seconds(mixed) == pytest.approx(0.010)
    assert served.step_seconds(decodes) == pytest.approx(0.010)
    assert served.step_seconds([Chunk(0, 200, True)]) == pytest.approx(0.010 + 0.002 + 0.002)


def test_an_aged_pool_hands_out_broken_runs_and_holds_every_block_free() -> None:
    pool = BlockPool(400)
    age(pool, random.Random(0))
    assert sorted(pool.free_blocks) == list(range(400))  # every block back, none held
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    runs = [b.block_id for b in pool.allocate(20)]
    assert runs == sorted(runs)  # one allocation in address order
    assert runs != list(range(runs[0], runs[0] + 20))  # but no longer one run, as a fresh pool's
    assert [b.block_id for b in BlockPool(400).allocate(20)] == list(range(20))


def test_a_pool_too_small_to_age_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="too few to age"):
        age(BlockPool(20), random.Random(0))
