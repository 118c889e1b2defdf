"""The spend controller on its own: it converges on a target, follows a shift, and starts from the
calibrated curve."""

from __future__ import annotations

import numpy as np
import pytest

from router.core.spend_control import W_MAX, W_MIN, SpendController, initial_cost_weight


def _spend(w: float, scale: float, rng: np.random.Generator) -> float:
    """A stand-in for the router: cost per call falls with w (log-linear), noisily."""
    return scale * 0.001 * w**-0.6 * float(rng.lognormal(0.0, 0.8))


def test_it_holds_the_mean_spend_at_the_target_and_follows_a_shift_in_the_mix() -> None:
    rng = np.random.default_rng(0)
    target = 0.01
    controller = SpendController(target, cost_weight=0.5)
    spent = []
    for i in range(6000):
        scale = 1.0 if i < 3000 else 3.0  # the traffic turns three times as expensive
        cost = _spend(controller.cost_weight, scale, rng)
        controller.observe(cost)
        spent.append(cost)
    for start in (1000, 4000):
        window = np.mean(spent[start : start + 2000])
        assert window == pytest.approx(target, rel=0.15)
    assert W_MIN <= controller.cost_weight <= W_MAX


def test_it_starts_where_the_calibrated_curve_spends_the_target() -> None:
    curve = [(1e-4, 0.02), (1e-3, 0.01), (1e-2, 0.004), (1e-1, 0.001)]
    assert initial_cost_weight(curve, 0.01, default=0.5) == pytest.approx(1e-3)
    between = initial_cost_weight(curve, 0.006, default=0.5)
    assert 1e-3 < between < 1e-2
    assert initial_cost_weight(curve, 1.0, default=0.5) == pytest.approx(1e-4)  # beyond: the end
    assert initial_cost_weight([], 0.01, default=0.3) == 0.3


def test_reported_costs_steer_it_to_the_bill_not_the_estimate() -> None:
    """Estimates that run 40% low: without reports the bill overshoots the target by that much; with
    reports on a fifth of the decisions (the rest corrected by the ratio) the bill meets it."""
    target = 0.01
    billed = {}
    for reporting in (False, True):
        rng = np.random.default_rng(1)
        controller = SpendController(target, cost_weight=0.5)
        bill = []
        for i in range(8000):
            predicted = _spend(controller.cost_weight, 1.0, rng)
            actual = predicted * 1.4 * float(rng.lognormal(0.0, 0.3))
            controller.observe(predicted)
            if reporting and i % 5 == 0:
                controller.report(predicted, actual)
            bill.append(actual)
        billed[reporting] = float(np.mean(bill[2000:]))
    assert billed[False] == pytest.approx(1.4 * 1.046 * target, rel=0.1)  # lognormal mean e^(0.3^2/2)
    assert billed[True] == pytest.approx(target, rel=0.05)


def test_without_reports_the_correction_is_one() -> None:
    controller = SpendController(0.01, cost_weight=0.1)
    assert controller.correction == 1.0
    controller.report(0.002, 0.001)
    assert controller.correction == pytest.approx(0.5)
    controller.report(1e-9, 1.0)  # one absurd report cannot make w run away
    assert controller.correction <= 10.0


def test_a_wild_reported_cost_moves_w_a_bounded_step_and_it_recovers() -> None:
    """A reported cost a million times its prediction (a caller's unit error): the next decisions
    must not fail (an unbounded step overflowed exp), w stays in range, and with truthful reports
    after it the controller is back on the target."""
    rng = np.random.default_rng(3)
    controller = SpendController(0.01, cost_weight=0.1)
    for _ in range(500):
        controller.observe(_spend(controller.cost_weight, 1.0, rng))
    controller.report(0.01, 1e4)
    weights = []
    for i in range(6000):
        predicted = _spend(controller.cost_weight, 1.0, rng)
        controller.observe(predicted)
        if i % 5 == 0:
            controller.report(predicted, predicted)
        weights.append(controller.cost_weight)
    assert all(W_MIN <= w <= W_MAX for w in weights)
    spend = [_spend(w, 1.0, rng) for w in weights[-2000:]]
    assert float(np.mean(spend)) == pytest.approx(0.01, rel=0.15)


def test_a_report_on_a_decision_predicted_free_leaves_the_state_finite() -> None:
    """A model priced at 0 gives the reported/predicted check no scale; taken whole, reports of
    1e308 USD made the state inf, then w NaN, and every later flush of the spend store failed."""
    controller = SpendController(0.001, cost_weight=0.1)
    controller.observe(0.002)
    before = controller.state
    for _ in range(3):
        controller.report(0.0, 1e308)
    assert controller.state == before and controller.correction == 1.0
    controller.observe(0.0)
    state = controller.state
    assert all(np.isfinite(v) for v in (state.cost_weight, state.average_usd, state.reported_usd))
    assert W_MIN <= controller.cost_weight <= W_MAX
