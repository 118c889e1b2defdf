"""The estimates of a model added to a bundle from a few hundred scored anchor prompts.

The new model is described as a mix of the bundle's models, shifted: how its outcomes on the anchors
relate to theirs on the same prompts, carried to any prompt through the bundle's own estimates:

    quality(x)       = clip(b + sum_j w_j q_j(x), 0, 1)
    output_tokens(x) = max(s * exp(c + sum_j v_j log(1 + o_j(x))) - 1, 0)

where q_j and o_j are the bundle's quality and output-length estimates for its models, and the
weights w (and v) are non-negative and sum to one (UniRoute describes models by their outcomes on
representative prompts in the same spirit). A mix keeps the spread of the estimates it mixes,
where an unconstrained regression on a few hundred noisy outcomes shrinks it; on validation carved
from `train` the mix recovered as much as ridge regression or more (docs/BENCHMARKS.md), and its
weights say which models the new one resembles.

The regressors on an anchor are the other models' *observed* outcomes there wherever the bundle's
training data has them, the bundle's estimates elsewhere: a linear relation between outcomes holds
between their expected values too, and expected values are what the heads estimate. (Fitting on
the heads' estimates of training prompts instead learns from in-sample estimates, sharper than any
new prompt gets, which measured worse.) s is Duan's smearing factor, so that the output length is
a mean, as a cost needs.

`AddedModel` owns its prediction and its ONNX part as a tested pair, as `HeadsModel` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from training.onnx_graph import EDIT_INPUTS, HEADS_OUTPUTS, batch_tensors, model_of

# Weight of the sum-to-one equation in the non-negative least squares (then renormalised).
SUM_TO_ONE = 1e3
# The graph runs in float32; the Python prediction in float64.
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Mixture:
    """y = intercept + z @ weights, weights >= 0 summing to one."""

    intercept: float
    weights: np.ndarray  # one per bundle model
    rmse: float  # on the anchors it was fitted on

    def predict(self, z: np.ndarray) -> np.ndarray:
        return self.intercept + z @ self.weights


def fit_mixture(z: np.ndarray, y: np.ndarray) -> Mixture:
    """Least squares with a free intercept and mixture weights (scipy's NNLS on centred data, with
    the sum-to-one condition as a heavily weighted extra equation)."""
    from scipy.optimize import nnls

    z_mean, y_mean = z.mean(axis=0), float(y.mean())
    design = np.vstack([z - z_mean, np.full((1, z.shape[1]), SUM_TO_ONE)])
    target = np.concatenate([y - y_mean, [SUM_TO_ONE]])
    weights, _ = nnls(design, target)
    weights = weights / weights.sum()
    intercept = y_mean - float(z_mean @ weights)
    rmse = float(np.sqrt(np.mean((intercept + z @ weights - y) ** 2)))
    return Mixture(intercept, weights, rmse)


@dataclass(frozen=True)
class AddedModel:
    quality: Mixture
    tokens: Mixture | None  # None: the outcomes had no output token counts
    smearing: float

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
        quality = fit_mixture(quality_regressors, score)
        known = ~np.isnan(output_tokens)
        if known.sum() < min_token_rows:
            return cls(quality, None, 1.0)
        z = np.log1p(np.maximum(token_regressors[known], 0.0))
        y = np.log1p(output_tokens[known])
        tokens = fit_mixture(z, y)
        smearing = float(np.mean(np.exp(y - tokens.predict(z))))
        return cls(quality, tokens, smearing)

    def predict(self, quality: np.ndarray, output_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The new model's (quality, output tokens) from the bundle's estimates (prompts x models)."""
        q = np.clip(self.quality.predict(quality), 0.0, 1.0)
        if self.tokens is None:
            return q, np.zeros(len(q))
        log_mean = self.tokens.predict(np.log1p(np.maximum(output_tokens, 0.0)))
        return q, np.maximum(self.smearing * np.exp(log_mean) - 1.0, 0.0)

    def to_onnx(self, n_models: int) -> onnx.ModelProto:
        """The edit part: the bundle's (quality, output_tokens) in, the same with one column more out."""
        q_in, o_in = EDIT_INPUTS
        tokens = self.tokens or Mixture(0.0, np.zeros(n_models), 0.0)
        constants = {
            "w_quality": self.quality.weights.reshape(n_models, 1),
            "b_quality": np.array(self.quality.intercept),
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
        """What the manifest records of the fit: the models the new one resembles, and the errors."""

        def resembles(mixture: Mixture) -> dict[str, float]:
            top = np.argsort(-mixture.weights)[:5]
            return {models[j]: round(float(mixture.weights[j]), 3) for j in top if mixture.weights[j] >= 0.01}

        return {
            "quality_mix": resembles(self.quality),
            "quality_shift": round(self.quality.intercept, 4),
            "quality_rmse": round(self.quality.rmse, 4),
            "tokens_mix": resembles(self.tokens) if self.tokens else None,
            "tokens_rmse_log": round(self.tokens.rmse, 4) if self.tokens else None,
            "tokens_smearing": round(self.smearing, 4) if self.tokens else None,
        }
