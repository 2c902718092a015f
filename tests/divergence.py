"""Greedy runs that may part only where the reference itself nearly tied."""

from __future__ import annotations

from collections.abc import Sequence

from llmscale.engine.outputs import CompletionOutput


def first_divergence(got: Sequence[int], want: Sequence[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)


def assert_parts_only_at_near_ties(reference: Sequence[CompletionOutput], other: Sequence[Sequence[int]],
                                   max_gap: float) -> None:
    """Each `other` run equals its reference run (greedy, with logprobs=2) up to where it ends,
    or parts from it at a token whose top-2 reference logprobs lie within `max_gap` nats: a
    different order of summation may flip a near-tie, a wrong kernel parts at confident tokens."""
    for ref, run in zip(reference, other, strict=True):
        i = first_divergence(run, ref.token_ids)
        if i is not None:
            top = sorted(ref.logprobs[i].values(), reverse=True)
            assert top[0] - top[1] <= max_gap, f"parted at token {i} without a near-tie: {top[:2]}"
