"""Cost arithmetic and the token-count map."""

from __future__ import annotations

import numpy as np
import pytest

from router.core.pricing import Prices, TokenEstimator


def test_cost_is_input_times_input_price_plus_output_times_output_price() -> None:
    prices = Prices.from_rows([("a", 1.0, 2.0), ("b", 10.0, 30.0)])
    cost = prices.cost_usd(np.array([100.0]), np.array([[50.0, 0.0]]))
    assert cost[0, 0] == pytest.approx((100 * 1.0 + 50 * 2.0) / 1e6)
    assert cost[0, 1] == pytest.approx(100 * 10.0 / 1e6)


def test_token_estimator_recovers_a_linear_map_and_never_goes_below_one() -> None:
    rng = np.random.default_rng(0)
    pieces = rng.integers(1, 500, 300).astype(float)
    chars = pieces * 4 + rng.integers(0, 5, 300)
    tokens = 3 + 0.9 * pieces + 0.01 * chars
    est = TokenEstimator.fit(pieces, chars, tokens)
    assert np.abs(est.estimate(pieces, chars) - tokens).max() <= 0.5 + 1e-9
    assert est.estimate(np.array([0.0]), np.array([0.0]))[0] >= 1.0


def test_a_long_run_without_spaces_counts_by_its_characters() -> None:
    """One [UNK] word piece for 96,000 characters: the character floor, not one token."""
    est = TokenEstimator(intercept=2.0, per_word_piece=1.0, per_char=-0.001)
    assert est.estimate(np.array([1.0]), np.array([96_000.0]))[0] >= 96_000 / 8
    prose = est.estimate(np.array([250.0]), np.array([1_000.0]))[0]
    assert prose == pytest.approx(251.0)  # where word pieces count well, the floor changes nothing
