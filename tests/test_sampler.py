"""The sampler against hand-built logits: masks, penalties, min_tokens, seeds, logprobs, and
`SamplingParams` validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscale.config import ConfigError
from llmscale.engine.sampler import (
    CANDIDATE_WIDTHS,
    Sampler,
    SamplingRow,
    apply_penalties,
    apply_top_k_top_p_min_p,
)
from llmscale.engine.sampling_params import SamplingParams
from llmscale.kernels import cpu as cpu_kernels

NEG_INF = float("-inf")
needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels do not build here")


def row(output: list[int] | None = None, prompt: list[int] | None = None, eos: tuple[int, ...] = (),
        **kw: object) -> SamplingRow:
    params = SamplingParams(**kw)  # type: ignore[arg-type]
    gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(output or []), list(prompt or []), gen, eos)


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in logits]


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([probs]).log()


# ----- top-k / top-p / min-p masks ------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    top_k = torch.tensor([1, 3, 0, -1, 50])  # 0, -1 and k >= V: off
    out = apply_top_k_top_p_min_p(logits.clone(), top_k=top_k)
    for r, k in enumerate([1, 3, 50, 50, 50]):
        assert kept(out[r : r + 1])[0] == set(logits[r].topk(k).indices.tolist())
        assert torch.equal(out[r][torch.isfinite(out[r])], logits[r][torch.isfinite(out[r])])


@pytest.mark.parametrize("k", [CANDIDATE_WIDTHS[0] + 44, CANDIDATE_WIDTHS[1] + 400])
def test_top_k_beyond_the_candidates(k: int) -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, CANDIDATE_WIDTHS[1] + 1000)
    out = apply_top_k_top_p_min_p(logits.clone(), top_k=torch.tensor([k, 5]))
    assert kept(out) == [set(logits[0].topk(k).indices.tolist()), set(logits[1].topk(5).indices.tolist())]


def test_top_p_boundary() -> None:
    logits = log_probs(0.5, 0.3, 0.2).expand(6, 3).clone()
    top_p = torch.tensor([0.8, 0.81, 0.5, 0.49, 0.51, 1.0])
    out = apply_top_k_top_p_min_p(logits, top_p=top_p)
    assert kept(out) == [{0, 1}, {0, 1, 2}, {0}, {0}, {0, 1}, {0, 1, 2}]


def test_top_p_renormalises_after_top_k() -> None:
    # After top-k=2 the probs are [4/7, 3/7]: 0.57 >= 0.5 keeps one (the raw 0.4 would need two).
    out = apply_top_k_top_p_min_p(log_probs(0.4, 0.3, 0.2, 0.1), top_k=torch.tensor([2]),
                                  top_p=torch.tensor([0.5]))
    assert kept(out) == [{0}]


def reference_top_k_top_p(logits: torch.Tensor, k: int, p: float) -> set[int]:
    """Float64, one token at a time: the k best, then the smallest prefix of them holding p."""
    order = logits.double().argsort(descending=True)[: k if k > 0 else None]
    probs = logits.double()[order].softmax(-1)
    n = int((probs.cumsum(0) < p).sum()) + 1
    return set(order[:n].tolist())


def test_top_k_top_p_match_reference_at_every_width() -> None:
    # Scales from peaky to flat: the kept set ends inside the first candidates, the second, or
    # only a full sort finds it.
    torch.manual_seed(2)
    vocab = CANDIDATE_WIDTHS[1] * 2
    scales = torch.tensor([8.0, 3.0, 1.5, 0.5, 0.05])[:, None]
    logits = torch.randn(5, vocab) * scales
    for p in (0.3, 0.9):
        out = apply_top_k_top_p_min_p(logits.clone(), top_p=torch.full((5,), p))
        sizes = [len(s) for s in kept(out)]
        assert kept(out) == [reference_top_k_top_p(r, 0, p) for r in logits], sizes
    assert sizes[0] < CANDIDATE_WIDTHS[0] < sizes[2] < CANDIDATE_WIDTHS[1] < sizes[4]
    # A top-k wider than the first candidates changes top-p's normaliser: it must wait for them.
    k = CANDIDATE_WIDTHS[0] + 100
    top_k = torch.tensor([k, k, 40, 0, vocab - 5])
    out = apply_top_k_top_p_min_p(logits.clone(), top_k=top_k, top_p=torch.full((5,), 0.5))
    assert kept(out) == [reference_top_k_top_p(r, int(kk), 0.5) for r, kk in zip(logits, top_k, strict=True)]


def test_min_p_keeps_tokens_above_the_scaled_max() -> None:
    logits = log_probs(0.5, 0.25, 0.15, 0.1).expand(3, 4).clone()
    out = apply_top_k_top_p_min_p(logits, min_p=torch.tensor([0.35, 0.19, 0.0]))
    assert kept(out) == [{0, 1}, {0, 1, 2, 3}, {0, 1, 2, 3}]
    torch.manual_seed(3)
    logits = torch.randn(4, 300) * 2
    min_p = torch.tensor([0.01, 0.1, 0.5, 1.0])
    out = apply_top_k_top_p_min_p(logits.clone(), min_p=min_p)
    probs = logits.softmax(-1)
    for r in range(4):
        expected = (probs[r] >= min_p[r] * probs[r].max()).nonzero().flatten().tolist()
        assert kept(out[r : r + 1])[0] == set(expected)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(-30, 30, width=32), min_size=1, max_size=40),
    k=st.integers(-1, 45),
    p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    use=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_kept_set_contains_the_max_and_is_top_closed(values: list[float], k: int, p: float, min_p: float,
                                                     use: tuple[bool, bool, bool]) -> None:
    logits = torch.tensor([values])
    out = apply_top_k_top_p_min_p(logits.clone(), torch.tensor([k]) if use[0] else None,
                                  torch.tensor([p]) if use[1] else None,
                                  torch.tensor([min_p]) if use[2] else None)
    keep = torch.isfinite(out[0])
    assert keep.any()
    assert out[0][keep].max() == logits.max()  # an argmax survives (any of tied ones)
    assert torch.equal(out[0][keep], logits[0][keep])  # survivors keep their values
    if not keep.all():
        assert logits[0][keep].min() >= logits[0][~keep].max()  # never a worse token over a better
    if use[0] and k > 0:
        assert int(keep.sum()) <= k
    if use[1] and not use[0] and not use[2]:
        assert logits[0].softmax(-1)[keep].sum() >= p - 1e-4


# ----- penalties and min_tokens ----------------------------------------------------------------


def test_penalties_change_the_right_logits_by_the_right_amounts() -> None:
    base = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]]).expand(4, 5)
    rows = [
        row(prompt=[0], output=[1, 2, 2], repetition_penalty=2.0, presence_penalty=0.5,
            frequency_penalty=0.25),
        row(prompt=[0], output=[1, 2, 2]),  # no penalty: untouched
        row(prompt=[0, 3], output=[4], repetition_penalty=0.5),
        row(prompt=[0], output=[3, 3, 3], frequency_penalty=-1.0),
    ]
    out = apply_penalties(base.clone(), rows)
    expected = torch.tensor([
        # repetition on {0, 1, 2}: 2 / 2, -2 * 2, 1 / 2; then token 1: -0.25 - 0.5, token 2: -0.5 - 0.5
        [1.0, -4.75, -0.5, 0.5, -1.0],
        [2.0, -2.0, 1.0, 0.5, -1.0],
        [4.0, -2.0, 1.0, 1.0, -0.5],  # prompt tokens count for repetition too
        [2.0, -2.0, 1.0, 3.5, -1.0],  # frequency 3 * -1 (negative: encourages)
    ])
    torch.testing.assert_close(out, expected)


def test_min_tokens_blocks_eos_and_stop_tokens() -> None:
    sampler = Sampler(seed=0)
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]]).expand(5, 4)
    rows = [
        row(output=[3], eos=(1,), temperature=0, min_tokens=2),  # EOS blocked: next best
        row(output=[3, 3], eos=(1,), temperature=0, min_tokens=2),  # long enough: EOS allowed
        row(output=[], eos=(1,), temperature=0, min_tokens=1, stop_token_ids=[2]),  # both blocked
        row(output=[], eos=(1,), temperature=0, min_tokens=1, ignore_eos=True),  # EOS ends nothing
        row(output=[], eos=(1,), temperature=1.0, min_tokens=3, stop_token_ids=[2], seed=5),
    ]
    for _ in range(20):
        tokens = [r.token_id for r in sampler(logits, rows)]
        assert tokens[:4] == [2, 1, 3, 1] and tokens[4] in (0, 3)


def test_min_tokens_with_nothing_to_forbid_keeps_the_one_argmax_path() -> None:
    """`bench serve` sends min_tokens with ignore_eos: no token to mask, so no float32 copy of
    the logits (the scratch buffer) is made for it; a stop token to forbid still gets one."""
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]]).expand(3, 4)
    sampler = Sampler(seed=0)
    rows = [row(output=[], eos=(1,), temperature=0, min_tokens=4, ignore_eos=True) for _ in range(3)]
    assert [r.token_id for r in sampler(logits, rows)] == [1, 1, 1]
    assert sampler._workspace is None
    rows[0] = row(output=[], eos=(1,), temperature=0, min_tokens=4, ignore_eos=True, stop_token_ids=[1])
    assert [r.token_id for r in sampler(logits, rows)] == [2, 1, 1]
    assert sampler._workspace is not None


# ----- greedy, seeds, distributions -------------------------------------------------------------


@pytest.mark.parametrize("dtype,cpu_argmax", [(torch.float32, False), (torch.bfloat16, False),
                                              pytest.param(torch.float32, True, marks=needs_kernels)])
def test_greedy_is_argmax(dtype: torch.dtype, cpu_argmax: bool) -> None:
    torch.manual_seed(4)
    logits = (torch.randn(16, 1000) * 3).to(dtype)
    before = logits.clone()
    rows = [row(temperature=0.0, top_k=5, top_p=0.5, seed=i) for i in range(16)]
    sampler = Sampler(cpu_argmax=cpu_argmax)
    assert [r.token_id for r in sampler(logits, rows)] == logits.float().argmax(-1).tolist()
    # Mixed with sampled rows (the general path), greedy rows still take the argmax.
    mixed = rows[:8] + [row(temperature=1.0) for _ in range(8)]
    assert [r.token_id for r in sampler(logits, mixed)][:8] == logits[:8].float().argmax(-1).tolist()
    assert torch.equal(logits, before)  # the caller's logits are never written


def run_steps(place: int, neighbours: list[SamplingRow], steps_logits: torch.Tensor,
              seed: int = 7) -> list[int]:
    """Sample the seeded request at row `place` among `neighbours` for every step."""
    target = row(seed=seed, top_p=0.9, top_k=40, temperature=0.8)
    sampler = Sampler()  # unseeded: the neighbours' draws differ on every run
    tokens = []
    for step in steps_logits:
        rows = neighbours[:place] + [target] + neighbours[place:]
        logits = step[torch.randint(0, len(step) - 1, (len(rows),))]  # neighbours: other logits
        logits[place] = step[-1]
        result = sampler(logits, rows)
        tokens.append(result[place].token_id)
        target.output_token_ids.append(result[place].token_id)
    return tokens


def test_seed_gives_the_same_tokens_whatever_the_batch() -> None:
    torch.manual_seed(5)
    steps = torch.randn(12, 9, 500) * 2
    alone = run_steps(0, [], steps)
    assert run_steps(0, [], steps) == alone
    others = [row(seed=11), row(), row(temperature=0), row(top_k=3), row(top_p=0.5, min_p=0.1),
              row(repetition_penalty=1.3, output=[1, 2]), row(seed=7), row(logprobs=3)]
    assert run_steps(3, others, steps) == alone
    assert run_steps(8, others[::-1], steps) == alone
    assert run_steps(0, others, steps, seed=8) != alone


def chi_square(tokens: list[int], probs: list[float]) -> float:
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).tolist()
    assert all(c == 0 for c, p in zip(counts, probs, strict=True) if p == 0)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True) if p > 0)


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, [0.5, 0.25, 0.15, 0.1]),
    ({"temperature": 0.5}, [25 / 35.5, 6.25 / 35.5, 2.25 / 35.5, 1 / 35.5]),
    ({"top_k": 2}, [2 / 3, 1 / 3, 0, 0]),
    ({"top_p": 0.7}, [2 / 3, 1 / 3, 0, 0]),
    ({"min_p": 0.25}, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),
])
def test_sampled_distribution_matches_the_probabilities(kw: dict[str, float], expected: list[float]) -> None:
    n = 20000
    logits = log_probs(0.5, 0.25, 0.15, 0.1).expand(n, 4)
    tokens = [r.token_id for r in Sampler(seed=0)(logits, [row(**kw)] * n)]
    # 3 degrees of freedom: P(chi2 > 25) ~ 2e-5; a wrong distribution gives hundreds.
    assert chi_square(tokens, expected) < 25


def test_seeded_row_draws_from_its_own_distribution() -> None:
    sampler = Sampler(seed=0)
    logits = log_probs(0.5, 0.25, 0.15, 0.1)
    r = row(seed=3)
    tokens = [sampler(logits, [r])[0].token_id for _ in range(2000)]
    assert chi_square(tokens, [0.5, 0.25, 0.15, 0.1]) < 25


# ----- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_the_raw_log_softmax_top_n_best_first() -> None:
    torch.manual_seed(6)
    logits = torch.randn(4, 300) * 2
    rows = [row(logprobs=5), row(logprobs=0, temperature=0), row(),
            row(logprobs=20, temperature=0.3, top_k=3, repetition_penalty=1.5, output=[1, 2], prompt=[3])]
    results = Sampler(seed=0)(logits, rows)
    ref = logits.log_softmax(-1)  # raw: no temperature, penalty or truncation
    for idx, (r, n) in enumerate(zip(results, [5, 0, None, 20], strict=True)):
        if n is None:
            assert r.logprob is None and r.top_logprobs is None
            continue
        assert r.top_logprobs is not None and r.logprob is not None
        assert len(r.top_logprobs) == n
        assert math.isclose(r.logprob, ref[idx, r.token_id].item(), abs_tol=1e-5)
        values = [v for _, v in r.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in r.top_logprobs] == ref[idx].topk(n).indices.tolist()
        torch.testing.assert_close(torch.tensor(values), ref[idx].topk(n).values)


def test_sampler_reuses_its_buffer_across_batch_sizes() -> None:
    sampler = Sampler(seed=0)
    for n in (8, 3, 12):
        logits = torch.zeros(n, 10)
        logits[:, 4] = 50.0
        assert [r.token_id for r in sampler(logits, [row(min_p=0.5)] * n)] == [4] * n


# ----- SamplingParams ---------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", -0.1),
    ("min_p", 1.1), ("presence_penalty", 2.5), ("presence_penalty", -2.1), ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("max_tokens", 0), ("min_tokens", -1),
    ("logprobs", -1), ("logprobs", 21), ("stop", ""), ("stop", ["ok", ""]),
])
def test_sampling_params_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_sampling_params_normalises_and_clones() -> None:
    p = SamplingParams(stop="###", stop_token_ids=None, max_tokens=None, temperature=1e-6)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.greedy
    assert SamplingParams().stop == [] and not SamplingParams().greedy
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    with pytest.raises(ConfigError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    q = p.clone()
    assert q == p
    assert isinstance(q.stop, list)
    q.stop.append("x")
    assert p.stop == ["###"]
