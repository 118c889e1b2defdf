"""The routing policy: a pure function from per-model estimates and the caller's wishes to a choice.

CARROT's rule: choose argmax over models of (1 - w) * quality - w * cost / c_ref. Hard constraints
(allowed_models, max_cost_usd, max_latency_ms) filter first; if the ceilings leave nothing, the
allowed model closest to them is chosen (the one whose largest ratio of prediction to ceiling is
smallest: the cheapest under a cost ceiling alone, the fastest under a latency ceiling alone) and
the reason says so. A model without latency data never meets a latency ceiling. The vectorised
form (`choose`) is what the evaluator sweeps, so the curves in the reports are the decisions the
service makes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

Number = TypeVar("Number", float, np.ndarray)


@dataclass(frozen=True, slots=True)
class Estimate:
    model: str
    quality: float
    cost_usd: float
    latency_ms: float | None = None  # None: the bundle has no latency data for the model


@dataclass(frozen=True, slots=True)
class Preferences:
    cost_weight: float
    allowed_models: frozenset[str] | None = None
    max_cost_usd: float | None = None
    max_latency_ms: float | None = None

    def meets_ceilings(self, e: Estimate) -> bool:
        if self.max_cost_usd is not None and e.cost_usd > self.max_cost_usd:
            return False
        if self.max_latency_ms is None:
            return True
        return e.latency_ms is not None and e.latency_ms <= self.max_latency_ms

    def log_overshoot(self, e: Estimate) -> float:
        """log of the largest ratio of a prediction to its ceiling (how far the model is from
        meeting them), what the fallback orders by. In logs because a ratio to a ceiling of 0, or
        to one so small that the ratio overflows, would be inf for every model and order nothing;
        the prediction over the smallest positive float keeps them in order."""
        logs = [-math.inf]
        if self.max_cost_usd is not None:
            logs.append(_log_ratio(e.cost_usd, self.max_cost_usd))
        if self.max_latency_ms is not None:
            logs.append(math.inf if e.latency_ms is None else _log_ratio(e.latency_ms, self.max_latency_ms))
        return max(logs)


_SMALLEST = 5e-324


def _log_ratio(value: float, ceiling: float) -> float:
    if value <= 0.0:
        return -math.inf
    return math.log(value) - math.log(max(ceiling, _SMALLEST))


@dataclass(frozen=True, slots=True)
class Scored:
    estimate: Estimate
    utility: float
    eligible: bool


@dataclass(frozen=True, slots=True)
class Decision:
    model: str
    reason: str
    cost_weight: float
    scored: tuple[Scored, ...]

    @property
    def chosen(self) -> Scored:
        return next(s for s in self.scored if s.estimate.model == self.model)


def utility(quality: Number, cost: Number, w: float, c_ref: float) -> Number:
    """Works on floats (one call's decision) and arrays (the evaluator's sweep) alike."""
    return (1.0 - w) * quality - w * cost / c_ref


def choose(quality: np.ndarray, cost: np.ndarray, w: float, c_ref: float) -> np.ndarray:
    """Index of the chosen model for each row of (prompts x models) estimates; ties go to the
    cheaper model, as in `decide`, so that offline figures are the service's decisions."""
    value = utility(quality, cost, w, c_ref)
    tied = value == value.max(axis=1, keepdims=True)
    return np.argmin(np.where(tied, cost, np.inf), axis=1)


def decide(estimates: Sequence[Estimate], prefs: Preferences, c_ref: float) -> Decision:
    if not estimates:
        raise ValueError("no candidate models")
    if not 0.0 <= prefs.cost_weight <= 1.0:
        raise ValueError(f"cost_weight must be in [0, 1], got {prefs.cost_weight}")
    w = prefs.cost_weight
    allowed = [e for e in estimates if prefs.allowed_models is None or e.model in prefs.allowed_models]
    if not allowed:
        raise ValueError("allowed_models excludes every candidate model")
    fits = [e for e in allowed if prefs.meets_ceilings(e)]
    utilities = {e.model: utility(e.quality, e.cost_usd, w, c_ref) for e in estimates}
    if fits:
        # Ties go to the cheaper model: same value for less money.
        best = max(fits, key=lambda e: (utilities[e.model], -e.cost_usd))
        reason = (
            f"highest utility (1-w)*quality - w*cost/c_ref at w={w:g} "
            f"among {len(fits)} eligible of {len(estimates)} models"
        )
        if len(fits) < len(allowed):
            reason += f" ({len(allowed) - len(fits)} above {_ceilings(prefs)})"
        eligible = {e.model for e in fits}
    else:
        best = min(allowed, key=lambda e: (prefs.log_overshoot(e), e.cost_usd, -e.quality))
        reason = _fallback_reason(prefs, best)
        eligible = {best.model}
    scored = tuple(Scored(e, utilities[e.model], e.model in eligible) for e in estimates)
    if best.model not in {e.model for e in estimates}:  # pragma: no cover - a guard, not a branch
        raise AssertionError("policy chose a model that is not a candidate")
    return Decision(model=best.model, reason=reason, cost_weight=w, scored=scored)


def _ceilings(prefs: Preferences) -> str:
    parts = []
    if prefs.max_cost_usd is not None:
        parts.append(f"max_cost_usd={prefs.max_cost_usd:g}")
    if prefs.max_latency_ms is not None:
        parts.append(f"max_latency_ms={prefs.max_latency_ms:g}")
    return " or ".join(parts)


def _fallback_reason(prefs: Preferences, best: Estimate) -> str:
    cost = f"predicted {best.cost_usd:.3g} USD"
    latency = "no latency data" if best.latency_ms is None else f"predicted {best.latency_ms:.0f} ms"
    if prefs.max_latency_ms is None:
        return (
            f"no allowed model is predicted to cost at most max_cost_usd={prefs.max_cost_usd:g}; "
            f"chose the cheapest allowed model ({cost})"
        )
    if prefs.max_cost_usd is None:
        return (
            f"no allowed model is predicted to answer within max_latency_ms={prefs.max_latency_ms:g}; "
            f"chose the fastest allowed model ({latency})"
        )
    return (
        f"no allowed model is predicted to meet both {_ceilings(prefs).replace(' or ', ' and ')}; "
        f"chose the allowed model closest to them ({cost}, {latency})"
    )


# The exploration rule with its random numbers bound: a greedy decision -> (served, propensity).
Explore = Callable[[Decision], tuple[Decision, float]]


def explore(decision: Decision, rate: float, draw: float, pick: float) -> tuple[Decision, float]:
    """Exploration: with probability `rate` the model is drawn uniformly from the eligible ones.

    `draw` and `pick` are uniform in [0, 1) (the caller's random numbers, so this stays a pure
    function). Returns the decision taken and its propensity, the probability this rule had of
    taking that model: (1 - rate) + rate / n for the greedy choice, rate / n for another one,
    with n eligible models; logged outcomes can be weighted by its inverse."""
    eligible = [s.estimate.model for s in decision.scored if s.eligible]
    n = len(eligible)
    greedy = (1.0 - rate) + rate / n
    if rate <= 0.0 or draw >= rate or n == 1:  # one eligible model: nothing to explore, keep why
        return decision, greedy
    model = eligible[min(int(pick * n), n - 1)]
    propensity = greedy if model == decision.model else rate / n
    reason = (
        f"exploration: drawn uniformly from the {n} eligible models (probability {rate:g} per call; "
        f"this choice {propensity:.3g}); the greedy choice was {decision.model}"
    )
    return Decision(
        model=model, reason=reason, cost_weight=decision.cost_weight, scored=decision.scored
    ), propensity
