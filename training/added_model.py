"""The estimates of a model added to a bundle from a few hundred scored anchor prompts.

The new model is described by how its outcomes relate to the bundle's models' outcomes on the same
prompts, and that relation is carried to any prompt through the bundle's own estimates:

    quality(x)       = clip(b + sum_j w_j q_j(x) - holdback, 0, 1)
    output_tokens(x) = max(s * exp(c + sum_j v_j log(1 + o_j(x))) - 1, 0)

where q_j and o_j are the bundle's quality and output-length estimates for its models. w and v are
fitted by ridge regression on the anchors (penalty chosen by five-fold cross-validation), with the
other models' *observed* outcomes on an anchor as regressors wherever the bundle's training data
has them (the bundle's estimates elsewhere): a linear relation between outcomes holds between
their expected values too, and expected values are what the heads estimate. Fitting on the heads'
estimates of training prompts instead learns from in-sample estimates, sharper than any new
prompt gets, which measured worse; so did non-negative weights, with or without summing to one
(docs/BENCHMARKS.md: validation carved from `train`, all three shared tables). s is Duan's
smearing factor, so that the output length is a mean, as a cost needs. The holdback is chosen by
`training/fleet.py` on the anchors.

`AddedModel` owns its prediction and its ONNX part as a tested pair, as `HeadsModel` does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from training.onnx_graph import EDIT_INPUTS, HEADS_OUTPUTS, batch_tensors, model_of

PENALTIES = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
FOLDS = 5
# The graph runs in float32; the Python prediction in float64.
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Ridge:
    intercept: float
    weights: np.ndarray  # one per bundle model
    penalty: float
    cv_rmse: float

    def predict(self, z: np.ndarray) -> np.ndarray:
        return self.intercept + z @ self.weights


def _solve(z: np.ndarray, y: np.ndarray, penalty: float) -> tuple[float, np.ndarray]:
    design = np.hstack([np.ones((len(z), 1)), z])
    regulariser = penalty * np.eye(design.shape[1])
    regulariser[0, 0] = 0.0  # the intercept is not shrunk
    coef = np.linalg.solve(design.T @ design + regulariser, design.T @ y)
    return float(coef[0]), coef[1:]


def fit_ridge(z: np.ndarray, y: np.ndarray, seed: int = 0) -> Ridge:
    """Ridge regression of y on z, the penalty chosen by cross-validated squared error."""
    order = np.random.default_rng(seed).permutation(len(y))
    folds = np.array_split(order, min(FOLDS, len(y)))
    best: tuple[float, float] | None = None
    for penalty in PENALTIES:
        squared = 0.0
        for k, held in enumerate(folds):
            rest = np.concatenate([f for i, f in enumerate(folds) if i != k])
            b, w = _solve(z[rest], y[rest], penalty)
            squared += float(np.sum((b + z[held] @ w - y[held]) ** 2))
        if best is None or squared < best[0]:
            best = (squared, penalty)
    assert best is not None
    b, w = _solve(z, y, best[1])
    return Ridge(b, w, best[1], float(np.sqrt(best[0] / len(y))))


def out_of_fold(z: np.ndarray, y: np.ndarray, estimates: np.ndarray, folds: int = 5) -> np.ndarray:
    """Each row's prediction (from `estimates`) by a ridge fit without that row's fold."""
    order = np.random.default_rng(0).permutation(len(y))
    out = np.empty(len(y))
    for held in np.array_split(order, folds):
        rest = np.setdiff1d(order, held)
        out[held] = np.clip(fit_ridge(z[rest], y[rest]).predict(estimates[held]), 0.0, 1.0)
    return out


@dataclass(frozen=True)
class AddedModel:
    quality: Ridge
    tokens: Ridge | None  # None: fewer than min_token_rows outcomes had output token counts
    smearing: float
    # Subtracted from the quality estimate: how far add-model holds the model back so that, on the
    # anchors, routing with it is no worse than without it (training/fleet.py).
    holdback: float = 0.0

    def held_back(self, delta: float) -> AddedModel:
        return replace(self, holdback=delta)

    @classmethod
    def fit(
        cls,
        quality_regressors: np.ndarray,
        score: np.ndarray,
        token_regressors: np.ndarray,
        output_tokens: np.ndarray,
        min_token_rows: int,
    ) -> AddedModel:
        """Regressors: anchors x bundle models (observed outcomes, else the bundle's estimates);
        score and output_tokens: the new model's on the anchors (output_tokens NaN where unknown)."""
        quality = fit_ridge(quality_regressors, score)
        known = ~np.isnan(output_tokens)
        if known.sum() < min_token_rows:
            return cls(quality, None, 1.0)
        z = np.log1p(np.maximum(token_regressors[known], 0.0))
        y = np.log1p(output_tokens[known])
        tokens = fit_ridge(z, y)
        smearing = float(np.mean(np.exp(y - tokens.predict(z))))
        return cls(quality, tokens, smearing)

    def predict(self, quality: np.ndarray, output_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The new model's (quality, output tokens) from the bundle's estimates (prompts x models)."""
        q = np.clip(self.quality.predict(quality) - self.holdback, 0.0, 1.0)
        if self.tokens is None:
            return q, np.zeros(len(q))
        log_mean = self.tokens.predict(np.log1p(np.maximum(output_tokens, 0.0)))
        return q, np.maximum(self.smearing * np.exp(log_mean) - 1.0, 0.0)

    def to_onnx(self, n_models: int) -> onnx.ModelProto:
        """The edit part: the bundle's (quality, output_tokens) in, the same with one column more out."""
        q_in, o_in = EDIT_INPUTS
        tokens = self.tokens or Ridge(0.0, np.zeros(n_models), 0.0, 0.0)
        constants = {
            "w_quality": self.quality.weights.reshape(n_models, 1),
            "b_quality": np.array(self.quality.intercept - self.holdback),
            "w_tokens": tokens.weights.reshape(n_models, 1),
            "b_tokens": np.array(tokens.intercept),
            "smearing": np.array(self.smearing if self.tokens is not None else 0.0),
            "zero": np.array(0.0),
            "one": np.array(1.0),
        }
        node = helper.make_node
        nodes = [
            node("MatMul", [q_in, "w_quality"], ["q_dot"]),
            node("Add", ["q_dot", "b_quality"], ["q_raw"]),
            node("Clip", ["q_raw", "zero", "one"], ["q_new"]),
            node("Concat", [q_in, "q_new"], ["quality"], axis=1),
            node("Relu", [o_in], ["o_pos"]),
            node("Add", ["o_pos", "one"], ["o_plus"]),
            node("Log", ["o_plus"], ["o_log"]),
            node("MatMul", ["o_log", "w_tokens"], ["o_dot"]),
            node("Add", ["o_dot", "b_tokens"], ["o_raw"]),
            node("Exp", ["o_raw"], ["o_exp"]),
            node("Mul", ["o_exp", "smearing"], ["o_mean"]),
            node("Sub", ["o_mean", "one"], ["o_shift"]),
            node("Relu", ["o_shift"], ["o_new"]),
            node("Concat", [o_in, "o_new"], ["output_tokens"], axis=1),
        ]
        graph = helper.make_graph(
            nodes,
            "added_model",
            batch_tensors(EDIT_INPUTS, n_models),
            batch_tensors(HEADS_OUTPUTS, n_models + 1),
            initializer=[
                numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in constants.items()
            ],
        )
        return model_of(graph)

    def summary(self, models: list[str]) -> dict[str, object]:
        """What the manifest records of the fit: the models its estimate leans on most, and errors."""

        def leans_on(ridge: Ridge) -> dict[str, float]:
            top = np.argsort(-np.abs(ridge.weights))[:5]
            return {models[j]: round(float(ridge.weights[j]), 3) for j in top}

        return {
            "quality_weights": leans_on(self.quality),
            "quality_intercept": round(self.quality.intercept, 4),
            "quality_penalty": self.quality.penalty,
            "quality_cv_rmse": round(self.quality.cv_rmse, 4),
            "quality_holdback": self.holdback,
            "tokens_weights": leans_on(self.tokens) if self.tokens else None,
            "tokens_cv_rmse_log": round(self.tokens.cv_rmse, 4) if self.tokens else None,
            "tokens_smearing": round(self.smearing, 4) if self.tokens else None,
        }
