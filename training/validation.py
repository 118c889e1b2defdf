"""Validation: the exported heads, run by the engine on validation carved from `train`.

What the manifest reports (figures, presets) is measured here on the ONNX graph the service will
run, through the same `Engine` as `Route`, never on the torch or LightGBM models it came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from router.core.embedder import Embedder
from router.core.engine import Engine
from router.core.features import PromptFeatures
from router.core.heads import Heads
from router.core.manifest import PolicySpec, PresetSpec, ValidationFigures
from router.core.policy import choose
from router.core.pricing import Prices, TokenEstimator
from training.metrics import W_GRID, Evaluation, evaluate
from training.tables import RoutingTable, complete_rows

log = logging.getLogger(__name__)

# Named operating points: target mean cost as a fraction of the most accurate single model's.
PRESET_COST_FRACTIONS = {"cost-10": 0.10, "cost-30": 0.30, "cost-50": 0.50}
DEFAULT_PRESET = "cost-30"
# Fewer validation prompts with every model's outcome than this calibrate the presets on estimates.
MIN_COMPLETE = 50


@dataclass(frozen=True)
class Validated:
    figures: ValidationFigures
    evaluation: Evaluation
    policy: PolicySpec


def calibrate_presets(
    q_pred: np.ndarray,
    c_pred: np.ndarray,
    score: np.ndarray,
    cost: np.ndarray,
    c_ref: float,
    basis: str = "calibrated on validation",
) -> dict[str, PresetSpec]:
    """For each preset, the smallest w whose decisions cost at most the target (`score` and `cost`:
    what the decisions are judged by, observed outcomes or the estimates themselves)."""
    best = int(np.argmax(score.mean(axis=0)))
    best_cost = float(cost[:, best].mean())
    rows = np.arange(len(score))
    costs = np.array([cost[rows, choose(q_pred, c_pred, float(w), c_ref)].mean() for w in W_GRID])
    presets = {
        "quality": PresetSpec(cost_weight=0.0, description="ignore cost: the highest predicted quality")
    }
    for name, fraction in PRESET_COST_FRACTIONS.items():
        fits = np.nonzero(costs <= fraction * best_cost)[0]
        w = float(W_GRID[fits[0]]) if fits.size else 1.0
        presets[name] = PresetSpec(
            cost_weight=round(w, 8),
            description=f"mean cost about {int(fraction * 100)}% of the most accurate single model's "
            f"({basis})",
        )
    return presets


def spend_curve(q_pred: np.ndarray, c_pred: np.ndarray, c_ref: float) -> list[tuple[float, float]]:
    """(w, mean predicted cost per call of the decisions at w) over a coarse grid: where a tenant's
    spend target starts its w (router/core/spend_control.py)."""
    rows = np.arange(len(q_pred))
    grid = [w for w in W_GRID[::8] if w > 0]
    return [(float(w), float(c_pred[rows, choose(q_pred, c_pred, float(w), c_ref)].mean())) for w in grid]


def validate(
    graph: bytes,
    embedder: Embedder,
    prices: Prices,
    token_estimator: TokenEstimator,
    c_ref: float,
    validation: RoutingTable,
    features: PromptFeatures,
) -> Validated:
    """Figures and presets of the heads `graph` on `validation` (whose features are `features`)."""
    policy = PolicySpec(c_ref_usd=c_ref, default_cost_weight=0.0)
    engine = Engine(embedder, Heads(graph), prices, token_estimator, policy, version="validation")
    est = engine.estimate_features(features)
    models = engine.models
    complete = complete_rows(validation, models)
    score = validation.matrix("score", models)[complete]
    cost = validation.matrix("cost_usd", models)[complete]
    q, c = est.quality[complete], est.cost_usd[complete]
    if complete.sum() >= MIN_COMPLETE:
        presets = calibrate_presets(q, c, score, cost, c_ref)
    else:
        # A table where few prompts have every model's outcome (sparse, or merged from benchmarks
        # that scored different models) would calibrate on a handful of prompts, or on none and put
        # every preset at w = 1: the estimates of all the validation prompts stand in for outcomes.
        log.warning(
            "validation: %d prompt(s) have an outcome of every model; the presets are calibrated on "
            "the estimates of all %d validation prompts",
            int(complete.sum()),
            len(complete),
        )
        presets = calibrate_presets(
            est.quality, est.cost_usd, est.quality, est.cost_usd, c_ref, basis="calibrated on estimates"
        )
    evaluation = evaluate(list(models), score, cost, q, c, c_ref)
    f = evaluation.figures
    figures = ValidationFigures(
        aiq=f["aiq"],
        aiq_zero=f["aiq_zero"],
        aiq_oracle=f["aiq_oracle"],
        gap_closed=f["gap_closed"],
        quality_at_w0=f["quality_at_w0"],
        quality_ece=f["calibration"]["quality_ece"],
        cost_mae_usd=f["calibration"]["cost_mae_usd"],
    )
    return Validated(
        figures,
        evaluation,
        PolicySpec(
            c_ref_usd=c_ref,
            default_cost_weight=presets[DEFAULT_PRESET].cost_weight,
            default_preset=DEFAULT_PRESET,
            presets=presets,
            spend_curve=spend_curve(est.quality, est.cost_usd, c_ref),
        ),
    )
