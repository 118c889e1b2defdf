"""The embedder's length-aware batch plan: covers every prompt once, in order, and is optimal."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from router.embedder import CALL_OVERHEAD_TOKENS, plan_batches


def _cost(lengths: list[int], groups: list[slice]) -> int:
    return sum(CALL_OVERHEAD_TOKENS + (g.stop - g.start) * lengths[g.stop - 1] for g in groups)


def _brute_force(lengths: list[int], max_batch: int) -> int:
    n = len(lengths)
    best = None
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], n]
        groups = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        if all(g.stop - g.start <= max_batch for g in groups):
            cost = _cost(lengths, groups)
            best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@given(st.lists(st.integers(3, 256), min_size=1, max_size=60), st.integers(1, 32))
def test_plan_covers_every_prompt_once_within_the_batch_bound(lengths: list[int], max_batch: int) -> None:
    lengths.sort()
    groups = plan_batches(lengths, max_batch)
    assert [i for g in groups for i in range(g.start, g.stop)] == list(range(len(lengths)))
    assert all(0 < g.stop - g.start <= max_batch for g in groups)


@given(st.lists(st.integers(3, 256), min_size=1, max_size=11), st.integers(1, 6))
def test_plan_is_as_cheap_as_any_split(lengths: list[int], max_batch: int) -> None:
    lengths.sort()
    assert _cost(lengths, plan_batches(lengths, max_batch)) == _brute_force(lengths, max_batch)


def test_similar_lengths_share_a_call_and_outliers_do_not() -> None:
    lengths = [20, 22, 23, 25, 250]
    assert [(g.start, g.stop) for g in plan_batches(lengths, 8)] == [(0, 4), (4, 5)]
    assert len(plan_batches([100] * 16, 8)) == 2
