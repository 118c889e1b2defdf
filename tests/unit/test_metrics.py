"""The measurement of METRICS.md on arrays small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import evaluate, hull, pair_metrics


def test_hull_drops_dominated_and_concave_violating_points() -> None:
    curve = hull(np.array([1.0, 2.0, 3.0, 4.0, 2.5]), np.array([0.2, 0.3, 0.8, 0.7, 0.1]))
    # (2, 0.3) lies under the chord from (1, 0.2) to (3, 0.8); (4, 0.7) and (2.5, 0.1) are dominated.
    assert curve.cost.tolist() == [1.0, 3.0]
    assert curve.quality.tolist() == [0.2, 0.8]


def test_curve_is_zero_before_first_point_and_flat_after_last() -> None:
    curve = hull(np.array([1.0, 3.0]), np.array([0.2, 0.8]))
    assert curve.at(0.5) == 0.0
    assert curve.at(2.0) == pytest.approx(0.5)
    assert curve.at(10.0) == pytest.approx(0.8)
    # area over [0, 5]: 0 on [0,1), trapezoid 1.0 on [1,3], flat 1.6 on [3,5]
    assert curve.area(0.0, 5.0) == pytest.approx(2.6)
    assert curve.cost_to_reach(0.5) == pytest.approx(2.0)
    assert curve.cost_to_reach(0.9) is None


def test_oracle_predictions_close_the_whole_gap_and_constant_ones_none() -> None:
    rng = np.random.default_rng(1)
    score = (rng.random((400, 3)) < np.array([0.3, 0.5, 0.7])).astype(float)
    cost = np.tile(np.array([1.0, 2.0, 4.0]) * 1e-4, (400, 1))
    models = ["a", "b", "c"]
    perfect = evaluate(models, score, cost, score, cost, 2e-4).figures
    assert perfect["gap_closed"] == pytest.approx(1.0)
    blind = evaluate(models, score, cost, np.tile(score.mean(0), (400, 1)), cost, 2e-4).figures
    assert blind["gap_closed"] == pytest.approx(0.0, abs=1e-9)
    assert blind["best_model"] == "c"
    assert 0.0 <= blind["calibration"]["quality_ece"] < 0.05


def test_pair_metrics_reward_a_good_ranking() -> None:
    rng = np.random.default_rng(2)
    weak = (rng.random(1000) < 0.5).astype(float)
    strong = np.maximum(weak, (rng.random(1000) < 0.5).astype(float))
    perfect = pair_metrics(strong - weak, strong, weak)
    noise = pair_metrics(rng.random(1000), strong, weak)
    assert perfect["apgr"] > 0.8
    assert abs(noise["apgr"] - 0.5) < 0.1
    assert perfect["cpt50"] is not None and perfect["cpt50"] < noise["cpt50"]


def test_models_of_one_cost_score_their_best_quality_not_zero() -> None:
    """Equal prices and token counts (an lm-eval log-likelihood table): the sweep's mean cost can
    land a rounding step above the models' mean, where the curve read 0 and every AIQ with it."""
    rng = np.random.default_rng(3)
    score = (rng.random((300, 3)) < np.array([0.4, 0.6, 0.5])).astype(float)
    cost = np.tile(rng.random((300, 1)) * 1e-4 + 1e-5, (1, 3))  # every model costs what the others do
    models = ["a", "b", "c"]
    f = evaluate(models, score, cost, score, cost, 1e-4).figures
    oracle = float(score.max(axis=1).mean())
    assert f["aiq_oracle"] == pytest.approx(oracle) and f["aiq"] == pytest.approx(oracle)
    assert f["aiq_zero"] == pytest.approx(score.mean(axis=0).max())
    assert f["gap_closed"] == pytest.approx(1.0)


def test_a_free_best_model_gives_no_cost_share_and_free_calls_no_percentage_error() -> None:
    """Dividing by the best model's cost, 0 for a self-hosted model priced 0, was a ZeroDivisionError;
    a free call's percentage error was its error over 1e-12."""
    rng = np.random.default_rng(4)
    score = (rng.random((200, 2)) < np.array([0.7, 0.4])).astype(float)
    cost = np.tile(np.array([0.0, 1e-4]), (200, 1))
    predicted = cost + np.array([1e-5, 1e-5])
    f = evaluate(["free", "paid"], score, cost, score, predicted, 1e-4).figures
    assert f["best_model"] == "free" and f["cost_to_match_best"] is None
    assert f["calibration"]["cost_mean_abs_pct_error"] == pytest.approx(0.1)
