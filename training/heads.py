"""Per-model LightGBM heads: one predicts the expected score, one the output length.

Quality: L2 regression on the observed score (fractional scores are common), clipped to 0..1 in
the exported graph. Output length: Poisson regression (log link), so the prediction is a mean
number of tokens, which is what an expected cost needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadParams:
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 40
    feature_fraction: float = 0.5
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    max_bin: int = 63
    max_rounds: int = 400
    early_stopping_rounds: int = 30
    # One thread: these fits are small, and OpenMP threads spin-waiting beside any other busy
    # process slowed them a hundredfold on a 2-core machine (measured), for no gain when idle.
    threads: int = 1
    seed: int = 0

    def lightgbm(self, objective: str) -> dict:
        return {
            "objective": objective,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": self.lambda_l2,
            "max_bin": self.max_bin,
            "num_threads": self.threads,
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbose": -1,
        }


@dataclass
class TrainedHeads:
    """Per model (in `models` order): a booster, or a constant where nothing could be learnt."""

    models: list[str]
    quality: list[object] = field(default_factory=list)
    output_tokens: list[object] = field(default_factory=list)
    rounds: dict[str, int] = field(default_factory=dict)

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LightGBM's own predictions, for checking the ONNX export against."""
        q = np.column_stack([_predict(h, features) for h in self.quality])
        o = np.column_stack([_predict(h, features) for h in self.output_tokens])
        return np.clip(q, 0.0, 1.0), np.maximum(o, 0.0)


def _predict(head: object, features: np.ndarray) -> np.ndarray:
    if isinstance(head, float):
        return np.full(len(features), head)
    return head.predict(features)  # type: ignore[attr-defined]


class _Binned:
    """Features binned once and shared by every model's boosters (binning dominates small fits)."""

    def __init__(self, x: np.ndarray, x_val: np.ndarray, params: HeadParams) -> None:
        import lightgbm as lgb

        config = params.lightgbm("regression")
        self.train = lgb.Dataset(x, label=np.zeros(len(x)), params=config, free_raw_data=False).construct()
        self.valid = (
            lgb.Dataset(x_val, label=np.zeros(len(x_val)), params=config, reference=self.train).construct()
            if len(x_val)
            else None
        )

    @staticmethod
    def labelled(base: Any, y: np.ndarray) -> Any:
        observed = ~np.isnan(y)
        data = base if observed.all() else base.subset(np.nonzero(observed)[0]).construct()
        data.set_label(y[observed])
        return data


def _fit_one(
    objective: str,
    binned: _Binned,
    y: np.ndarray,
    y_val: np.ndarray,
    params: HeadParams,
    rounds: int | None,
) -> tuple[object, int]:
    import lightgbm as lgb

    y_fit = y[~np.isnan(y)]
    if rounds == 0 or y_fit.size < 2 * params.min_data_in_leaf or np.ptp(y_fit) == 0:
        return (float(y_fit.mean()) if y_fit.size else 0.0), 0
    train_set = _Binned.labelled(binned.train, y)
    if rounds is not None or binned.valid is None:
        n = max(rounds or params.max_rounds, 1)
        return lgb.train(params.lightgbm(objective), train_set, num_boost_round=n), n
    valid = _Binned.labelled(binned.valid, y_val)
    booster = lgb.train(
        params.lightgbm(objective),
        train_set,
        num_boost_round=params.max_rounds,
        valid_sets=[valid],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
    )
    return booster, booster.best_iteration or params.max_rounds


def fit_heads(
    models: list[str],
    x: np.ndarray,
    score: np.ndarray,
    out_tokens: np.ndarray,
    x_val: np.ndarray,
    score_val: np.ndarray,
    out_tokens_val: np.ndarray,
    params: HeadParams,
    rounds: dict[str, int] | None = None,
) -> TrainedHeads:
    """Fits each model's heads on its observed rows; rounds come from validation unless given."""
    heads = TrainedHeads(models)
    binned = _Binned(x, x_val, params)
    for j, model in enumerate(models):
        q, nq = _fit_one(
            "regression",
            binned,
            score[:, j],
            score_val[:, j],
            params,
            None if rounds is None else rounds[f"quality/{model}"],
        )
        o, no = _fit_one(
            "poisson",
            binned,
            out_tokens[:, j],
            out_tokens_val[:, j],
            params,
            None if rounds is None else rounds[f"output_tokens/{model}"],
        )
        heads.quality.append(q)
        heads.output_tokens.append(o)
        heads.rounds[f"quality/{model}"] = nq
        heads.rounds[f"output_tokens/{model}"] = no
        log.debug("heads for %s: %d quality rounds, %d output rounds", model, nq, no)
    return heads
