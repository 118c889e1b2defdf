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
