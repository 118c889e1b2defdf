"""Per-model LightGBM boosters for one target (output length), with their ONNX export.

The output-length head is Poisson regression (log link), so its prediction is a mean number of
tokens, which is what an expected cost needs. Boosting rounds are chosen per model by early
stopping on validation, then reused when refitting on all of `train`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from training.onnx_graph import INPUT, model_of

log = logging.getLogger(__name__)
# onnxmltools' LightGBM converter goes up to this opset; onnx_graph brings the part to its own.
LIGHTGBM_OPSET = 15


@dataclass(frozen=True)
class BoosterParams:
    # lr 0.3 and at most 100 rounds: ~1,700 trees for mmlu_pro's 29 models against ~3,800 at
    # 0.15 / 200, and on validation carved from train (5 carvings) no worse once averaged with the
    # neighbours' output lengths. Each tree is paid for on every Route call.
    learning_rate: float = 0.3
    num_leaves: int = 15
    min_data_in_leaf: int = 40
    feature_fraction: float = 0.5
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    max_bin: int = 63
    max_rounds: int = 100
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
class Boosters:
    """Per model (in `models` order): a booster, or a constant where nothing could be learnt."""

    objective: str
    models: list[str]
    heads: list[object] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """prompts x models, as LightGBM computes it."""
        return np.column_stack([_predict(h, features) for h in self.heads])

    def to_onnx(self, n_features: int, output: str = "columns") -> onnx.ModelProto:
        """`features` -> `output` (prompts x models), the same values as `predict`.

        Every model's trees go into one TreeEnsembleRegressor (each tree adds to its model's
        column), followed by one link function: two operator calls per batch instead of two per
        model, each of which has a fixed cost that a lone prompt pays for."""
        link = LINKS[self.objective]
        merged: dict[str, Any] = {name: [] for name in TREE_ATTRIBUTES}
        trees = 0
        for j, head in enumerate(self.heads):
            # a constant column is one tree of one leaf (ONNX Runtime adds base values only to
            # columns that have trees)
            attrs = (
                _stump(link.inverse(head)) if isinstance(head, float) else _converted(head, n_features, link)
            )
            for name, values in attrs.items():
                if name in ("nodes_treeids", "target_treeids"):
                    values = [t + trees for t in values]
                elif name == "target_ids":
                    values = [j] * len(values)
                merged[name].extend(values)
            trees = max(merged["nodes_treeids"]) + 1
        raw = "raw" if link.op else output
        nodes = [
            helper.make_node(
                "TreeEnsembleRegressor",
                [INPUT],
                [raw],
                domain="ai.onnx.ml",
                n_targets=len(self.heads),
                post_transform="NONE",
                aggregate_function="SUM",
                **merged,
            )
        ]
        if link.op:
            nodes.append(helper.make_node(link.op, [raw], [output]))
        graph = helper.make_graph(
            nodes,
            "boosters",
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", n_features])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", len(self.heads)])],
        )
        return model_of(graph)


@dataclass(frozen=True)
class Link:
    """How a booster's raw score becomes its prediction, as an ONNX operator (None: identity)."""

    op: str | None
    inverse: Callable[[float], float]


# exp(-1e30) is exactly 0 in float32: the raw score of a model whose mean is 0
LINKS = {
    "poisson": Link("Exp", lambda mean: math.log(mean) if mean > 0 else -1e30),
    "regression": Link(None, float),
}
# What describes a tree ensemble (lists, concatenated when ensembles are merged).
TREE_ATTRIBUTES = (
    "nodes_falsenodeids",
    "nodes_featureids",
    "nodes_hitrates",
    "nodes_missing_value_tracks_true",
    "nodes_modes",
    "nodes_nodeids",
    "nodes_treeids",
    "nodes_truenodeids",
    "nodes_values",
    "target_ids",
    "target_nodeids",
    "target_treeids",
    "target_weights",
)


def _stump(raw: float) -> dict[str, list]:
    """A tree of one leaf, worth `raw`."""
    leaf: dict[str, list] = {
        "nodes_modes": [b"LEAF"],
        "nodes_hitrates": [1.0],
        "nodes_values": [0.0],
        "target_weights": [raw],
    }
    return {name: leaf.get(name, [0]) for name in TREE_ATTRIBUTES}


def _converted(booster: object, n_features: int, link: Link) -> dict[str, list]:
    """The trees of onnxmltools' conversion of one booster, checked to be the plain
    TreeEnsembleRegressor (+ link) that merging assumes."""
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    graph = onnxmltools.convert_lightgbm(
        booster, initial_types=[(INPUT, FloatTensorType([None, n_features]))], target_opset=LIGHTGBM_OPSET
    ).graph
    ops = [n.op_type for n in graph.node]
    if ops != ["TreeEnsembleRegressor", *([link.op] if link.op else [])]:
        raise ValueError(f"unexpected LightGBM conversion {ops}; expected a tree ensemble and {link.op}")
    attrs = {a.name: helper.get_attribute_value(a) for a in graph.node[0].attribute}
    trees = {k: list(v) for k, v in attrs.items() if k.startswith(("nodes_", "target_"))}
    plain = (
        attrs.get("n_targets") == 1 and not attrs.get("base_values") and set(trees) == set(TREE_ATTRIBUTES)
    )
    if not plain or attrs.get("post_transform", b"NONE") != b"NONE":
        raise ValueError("unexpected LightGBM conversion: not a single-target sum of trees")
    return trees


def _predict(head: object, features: np.ndarray) -> np.ndarray:
    if isinstance(head, float):
        return np.full(len(features), head)
    return head.predict(features)  # type: ignore[attr-defined]


class _Binned:
    """Features binned once and shared by every model's boosters (binning dominates small fits)."""

    def __init__(self, x: np.ndarray, x_val: np.ndarray, params: BoosterParams) -> None:
        import lightgbm as lgb

        config = params.lightgbm("regression")  # binning only: the objective is set per fit
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
    params: BoosterParams,
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


def fit_per_model(
    objective: str,
    models: list[str],
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    params: BoosterParams,
    rounds: list[int] | None = None,
) -> Boosters:
    """Fits each model's booster on its observed rows; rounds come from validation unless given."""
    out = Boosters(objective, models)
    binned = _Binned(x, x_val, params)
    for j in range(len(models)):
        head, n = _fit_one(
            objective, binned, y[:, j], y_val[:, j], params, None if rounds is None else rounds[j]
        )
        out.heads.append(head)
        out.rounds.append(n)
    return out
