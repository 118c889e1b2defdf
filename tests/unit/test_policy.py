"""The routing policy as a pure function: no server, no bundle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from router.core.policy import Estimate, Preferences, choose, decide, explore

C_REF = 1e-4
ESTIMATES = [
    Estimate("small", quality=0.40, cost_usd=0.1e-4),
    Estimate("medium", quality=0.60, cost_usd=1.0e-4),
    Estimate("large", quality=0.75, cost_usd=5.0e-4),
]


def test_w0_picks_the_highest_quality() -> None:
    assert decide(ESTIMATES, Preferences(cost_weight=0.0), C_REF).model == "large"


def test_w1_picks_the_cheapest() -> None:
    assert decide(ESTIMATES, Preferences(cost_weight=1.0), C_REF).model == "small"


def test_intermediate_w_trades_quality_for_cost() -> None:
    # utilities at w=0.05: small 0.375, medium 0.52, large 0.4625
    d = decide(ESTIMATES, Preferences(cost_weight=0.05), C_REF)
    assert d.model == "medium"
    by_model = {s.estimate.model: s.utility for s in d.scored}
    assert by_model["medium"] == pytest.approx(0.95 * 0.60 - 0.05 * 1.0)
    assert "highest utility" in d.reason


def test_allowed_models_restrict_the_choice() -> None:
    d = decide(ESTIMATES, Preferences(cost_weight=0.0, allowed_models=frozenset({"small", "medium"})), C_REF)
    assert d.model == "medium"
    assert {s.estimate.model for s in d.scored if not s.eligible} == {"large"}


def test_ceiling_filters_before_scoring() -> None:
    d = decide(ESTIMATES, Preferences(cost_weight=0.0, max_cost_usd=2e-4), C_REF)
    assert d.model == "medium"
    assert "above max_cost_usd" in d.reason


def test_nothing_under_the_ceiling_falls_back_to_the_cheapest_allowed() -> None:
    prefs = Preferences(cost_weight=0.0, allowed_models=frozenset({"medium", "large"}), max_cost_usd=1e-6)
    d = decide(ESTIMATES, prefs, C_REF)
    assert d.model == "medium"
    assert "cheapest allowed" in d.reason


def test_ties_go_to_the_cheaper_model() -> None:
    tied = [Estimate("dear", 0.5, 2e-4), Estimate("cheap", 0.5, 2e-4 - 1e-12)]
    assert decide(tied, Preferences(cost_weight=0.0), C_REF).model == "cheap"


def test_vectorised_ties_go_to_the_cheaper_model_too() -> None:
    """At w = 0 equal quality estimates tie whatever they cost (a neighbour mean of 0/1 scores often
    gives them); the evaluator must take the service's choice, not the first column."""
    quality = np.array([[0.5, 0.5, 0.2], [0.7, 0.7, 0.7], [0.1, 0.9, 0.9]])
    cost = np.array([[3e-4, 1e-4, 0.0], [2e-4, 2e-4, 1e-4], [0.0, 5e-4, 4e-4]])
    names = ["a", "b", "c"]
    picks = choose(quality, cost, 0.0, C_REF)
    assert picks.tolist() == [1, 2, 2]
    for i in range(3):
        est = [Estimate(n, float(quality[i, j]), float(cost[i, j])) for j, n in enumerate(names)]
        assert decide(est, Preferences(cost_weight=0.0), C_REF).model == names[picks[i]]


@pytest.mark.parametrize("w", [-0.1, 1.5, float("nan")])
def test_cost_weight_outside_unit_interval_is_refused(w: float) -> None:
    with pytest.raises(ValueError, match="cost_weight"):
        decide(ESTIMATES, Preferences(cost_weight=w), C_REF)


def test_vectorised_choice_matches_per_request_decision() -> None:
    """The evaluator's sweep and the service must make the same decisions."""
    rng = np.random.default_rng(0)
    quality, cost = rng.random((200, 5)), rng.random((200, 5)) * 1e-3
    names = [f"m{j}" for j in range(5)]
    for w in (0.0, 0.01, 0.3, 1.0):
        picks = choose(quality, cost, w, C_REF)
        for i in range(0, 200, 17):
            est = [Estimate(n, float(quality[i, j]), float(cost[i, j])) for j, n in enumerate(names)]
            assert decide(est, Preferences(cost_weight=w), C_REF).model == names[picks[i]]


FAST_SLOW = [
    Estimate("small", quality=0.40, cost_usd=0.1e-4, latency_ms=300.0),
    Estimate("medium", quality=0.60, cost_usd=1.0e-4, latency_ms=900.0),
    Estimate("large", quality=0.75, cost_usd=5.0e-4, latency_ms=2500.0),
    Estimate("unknown", quality=0.99, cost_usd=0.1e-4, latency_ms=None),
]


def test_a_latency_ceiling_excludes_exactly_the_models_predicted_above_it() -> None:
    d = decide(FAST_SLOW, Preferences(cost_weight=0.0, max_latency_ms=900.0), C_REF)
    assert d.model == "medium"  # at the ceiling counts as meeting it
    assert {s.estimate.model for s in d.scored if s.eligible} == {"small", "medium"}
    assert "above max_latency_ms=900" in d.reason


def test_a_model_without_latency_data_never_meets_a_latency_ceiling() -> None:
    assert decide(FAST_SLOW, Preferences(cost_weight=0.0), C_REF).model == "unknown"
    d = decide(FAST_SLOW, Preferences(cost_weight=0.0, max_latency_ms=1e9), C_REF)
    assert d.model == "large" and not next(s for s in d.scored if s.estimate.model == "unknown").eligible


def test_nothing_under_the_latency_ceiling_falls_back_to_the_fastest_allowed() -> None:
    allowed = frozenset({"medium", "large", "unknown"})
    d = decide(FAST_SLOW, Preferences(cost_weight=0.0, allowed_models=allowed, max_latency_ms=100.0), C_REF)
    assert d.model == "medium" and "fastest allowed model" in d.reason
    assert [s.estimate.model for s in d.scored if s.eligible] == ["medium"]


def test_both_ceilings_unmet_fall_back_to_the_model_closest_to_them() -> None:
    # small: cost 0.1e-4 / 0.05e-4 = 2x, latency 300 / 200 = 1.5x -> 2x; medium: 20x and 4.5x
    prefs = Preferences(cost_weight=0.5, max_cost_usd=0.05e-4, max_latency_ms=200.0)
    d = decide(FAST_SLOW[:3], prefs, C_REF)
    assert d.model == "small" and "closest to them" in d.reason
    assert prefs.log_overshoot(FAST_SLOW[0]) == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("ceiling", [0.0, 1e-310])
def test_a_latency_ceiling_nothing_can_meet_still_falls_back_to_the_fastest(ceiling: float) -> None:
    """Every ratio to a zero (or subnormal) ceiling was inf, and the tie went to the cheapest."""
    slow_but_cheap = [
        Estimate("fast", quality=0.5, cost_usd=5e-4, latency_ms=150.0),
        Estimate("slow", quality=0.5, cost_usd=1e-4, latency_ms=500.0),
    ]
    d = decide(slow_but_cheap, Preferences(cost_weight=0.5, max_latency_ms=ceiling), C_REF)
    assert d.model == "fast" and "fastest allowed model" in d.reason


def test_a_cost_ceiling_of_zero_falls_back_to_the_cheapest() -> None:
    d = decide(FAST_SLOW[:3], Preferences(cost_weight=0.0, max_cost_usd=0.0), C_REF)
    assert d.model == "small" and "cheapest allowed model" in d.reason


def test_exploration_draws_uniformly_among_the_eligible_and_reports_its_propensity() -> None:
    d = decide(ESTIMATES, Preferences(cost_weight=0.0), C_REF)
    n = len(ESTIMATES)
    kept, p_kept = explore(d, rate=0.2, draw=0.5, pick=0.0)  # draw >= rate: the greedy choice
    assert kept is d and p_kept == pytest.approx(0.8 + 0.2 / n)
    other = next(i for i, e in enumerate(ESTIMATES) if e.model != d.model)
    drawn, p_drawn = explore(d, rate=0.2, draw=0.1, pick=(other + 0.5) / n)
    assert drawn.model == ESTIMATES[other].model and p_drawn == pytest.approx(0.2 / n)
    assert "exploration" in drawn.reason and d.model in drawn.reason


def test_exploration_with_one_eligible_model_keeps_the_decision_and_its_reason() -> None:
    """A fallback (nothing meets the ceiling) leaves one eligible model; 'drawn from 1' hid why."""
    d = decide(FAST_SLOW[:3], Preferences(cost_weight=0.0, max_latency_ms=100.0), C_REF)
    drawn, propensity = explore(d, rate=0.5, draw=0.1, pick=0.3)
    assert drawn is d and propensity == 1.0 and "fastest allowed model" in drawn.reason
