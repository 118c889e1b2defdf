"""The routing policy: a pure function from per-model estimates and the caller's wishes to a choice.

CARROT's rule: choose argmax over models of (1 - w) * quality - w * cost / c_ref. Hard constraints
(allowed_models, max_cost_usd) filter first; if the ceiling leaves nothing, the cheapest allowed
model is chosen and the reason says so. The vectorised form (`choose`) is what the evaluator sweeps,
so the curves in the reports are the decisions the service makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

Number = TypeVar("Number", float, np.ndarray)


@dataclass(frozen=True, slots=True)
class Estimate:
    model: str
    quality: float
    cost_usd: float


@dataclass(frozen=True, slots=True)
class Preferences:
    cost_weight: float
    allowed_models: frozenset[str] | None = None
    max_cost_usd: float | None = None


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
    """Index of the chosen model for each row of (prompts x models) estimates."""
    return np.argmax(utility(quality, cost, w, c_ref), axis=1)


def decide(estimates: Sequence[Estimate], prefs: Preferences, c_ref: float) -> Decision:
    if not estimates:
        raise ValueError("no candidate models")
    if not 0.0 <= prefs.cost_weight <= 1.0:
        raise ValueError(f"cost_weight must be in [0, 1], got {prefs.cost_weight}")
    w = prefs.cost_weight
    allowed = [e for e in estimates if prefs.allowed_models is None or e.model in prefs.allowed_models]
    if not allowed:
        raise ValueError("allowed_models excludes every candidate model")
    ceiling = prefs.max_cost_usd
    fits = [e for e in allowed if ceiling is None or e.cost_usd <= ceiling]
    utilities = {e.model: utility(e.quality, e.cost_usd, w, c_ref) for e in estimates}
    if fits:
        # Ties go to the cheaper model: same value for less money.
        best = max(fits, key=lambda e: (utilities[e.model], -e.cost_usd))
        reason = (
            f"highest utility (1-w)*quality - w*cost/c_ref at w={w:g} "
            f"among {len(fits)} eligible of {len(estimates)} models"
        )
        if len(fits) < len(allowed):
            reason += f" ({len(allowed) - len(fits)} above max_cost_usd={ceiling:g})"
        eligible = {e.model for e in fits}
    else:
        best = min(allowed, key=lambda e: (e.cost_usd, -e.quality))
        reason = (
            f"no allowed model is predicted to cost at most max_cost_usd={ceiling:g}; "
            f"chose the cheapest allowed model (predicted {best.cost_usd:.3g} USD)"
        )
        eligible = {best.model}
    scored = tuple(Scored(e, utilities[e.model], e.model in eligible) for e in estimates)
    if best.model not in {e.model for e in estimates}:  # pragma: no cover - a guard, not a branch
        raise AssertionError("policy chose a model that is not a candidate")
    return Decision(model=best.model, reason=reason, cost_weight=w, scored=scored)
