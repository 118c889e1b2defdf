"""How a router is measured (shared/docs/METRICS.md), on arrays of scores, costs and predictions.

All inputs are (prompts x models) arrays restricted to prompts that every model answered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from router.core.policy import choose

# w = 0 plus a geometric grid: the interesting trade-offs are often at small w.
W_GRID = np.concatenate([[0.0], np.geomspace(1e-5, 1.0, 240)])


@dataclass(frozen=True)
class Curve:
    """Vertices of a non-decreasing upper convex hull in (cost, quality)."""

    cost: np.ndarray
    quality: np.ndarray

    def at(self, cost: float) -> float:
        """Best quality at mean cost <= `cost`: 0 before the first vertex, flat after the last."""
        if cost < self.cost[0]:
            return 0.0
        return float(np.interp(cost, self.cost, self.quality))

    def area(self, lo: float, hi: float) -> float:
        """Integral of the curve over [lo, hi]."""
        if hi <= lo:
            return 0.0
        xs = np.concatenate([[lo, hi], self.cost[(self.cost > lo) & (self.cost < hi)]])
        xs = np.unique(xs)
        # Just before the first vertex the curve is 0: split there so the jump is not smeared.
        first = self.cost[0]
        total = 0.0
        for a, b in pairwise(xs):
            if b <= first:
                continue
            a = max(a, first)
            total += 0.5 * (self.at(a) + self.at(b)) * (b - a)
        return total

    def cost_to_reach(self, quality: float) -> float | None:
        """Least mean cost at which the curve reaches `quality`, None if it never does."""
        if self.quality[-1] < quality:
            return None
        if self.quality[0] >= quality:
            return float(self.cost[0])
        i = int(np.argmax(self.quality >= quality))
        c0, c1, q0, q1 = self.cost[i - 1], self.cost[i], self.quality[i - 1], self.quality[i]
        return float(c0 + (quality - q0) * (c1 - c0) / (q1 - q0))


def hull(cost: np.ndarray, quality: np.ndarray) -> Curve:
    """Non-decreasing upper convex hull: what mixing neighbouring operating points can reach."""
    order = np.lexsort((-np.asarray(quality), np.asarray(cost)))
    pts = np.column_stack([np.asarray(cost)[order], np.asarray(quality)[order]])
    # Keep, for each cost, the best quality; then drop points dominated by a cheaper better one.
    kept: list[np.ndarray] = []
    for p in pts:
        if kept and p[1] <= kept[-1][1]:
            continue
        kept.append(p)
    upper: list[np.ndarray] = []
    for p in kept:
        while len(upper) >= 2:
            (x1, y1), (x2, y2) = upper[-2], upper[-1]
            # Drop the middle point when it lies on or below the chord from upper[-2] to p.
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                upper.pop()
            else:
                break
        upper.append(p)
    arr = np.array(upper)
    return Curve(arr[:, 0], arr[:, 1])


def sweep(
    q_pred: np.ndarray, c_pred: np.ndarray, score: np.ndarray, cost: np.ndarray, c_ref: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w, mean observed cost, mean observed quality) of the decisions at each w of the grid."""
    rows = np.arange(score.shape[0])
    costs, quals = [], []
    for w in W_GRID:
        pick = choose(q_pred, c_pred, float(w), c_ref)
        costs.append(cost[rows, pick].mean())
        quals.append(score[rows, pick].mean())
    return W_GRID, np.array(costs), np.array(quals)


def ece(pred: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error with equal-width bins over [0, 1]."""
    pred, actual = np.ravel(pred), np.ravel(actual)
    idx = np.clip((pred * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(pred[sel].mean() - actual[sel].mean())
    return float(total)


def pair_metrics(advantage: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> dict[str, float | None]:
    """RouteLLM's APGR and CPT: send the prompts with the largest predicted advantage to the strong model.

    `advantage` ranks prompts; strong/weak are the observed scores of the two models.
    """
    n = len(advantage)
    order = np.argsort(-advantage, kind="stable")
    gain = (strong - weak)[order]
    # quality with the top-k prompts sent to the strong model, k = 0..n
    quality = weak.mean() + np.concatenate([[0.0], np.cumsum(gain)]) / n
    q_weak, q_strong = weak.mean(), strong.mean()
    gap = q_strong - q_weak
    share = np.arange(n + 1) / n
    pgr = (quality - q_weak) / gap if gap > 0 else np.zeros_like(quality)
    apgr = float(np.trapezoid(pgr, share))

    def cpt(target: float) -> float | None:
        hit = np.nonzero(pgr >= target)[0]
        return float(share[hit[0]]) if hit.size else None

    return {"apgr": apgr, "cpt50": cpt(0.5), "cpt80": cpt(0.8), "random_apgr": 0.5}


def _pct_error(pred: np.ndarray, actual: np.ndarray) -> float | None:
    paid = actual > 0
    return float(np.mean(np.abs(pred[paid] - actual[paid]) / actual[paid])) if paid.any() else None


@dataclass
class Evaluation:
    """Every figure of METRICS.md for one router on one split."""

    figures: dict
    router_points: np.ndarray  # (w, cost, quality)
    router_curve: Curve
    oracle_curve: Curve
    zero_curve: Curve
    single: dict[str, tuple[float, float]]  # model -> (cost, quality)


def evaluate(
    models: list[str],
    score: np.ndarray,
    cost: np.ndarray,
    q_pred: np.ndarray,
    c_pred: np.ndarray,
    c_ref: float,
    strong_model: str | None = None,
) -> Evaluation:
    n, m = score.shape
    single_cost, single_q = cost.mean(axis=0), score.mean(axis=0)
    lo, hi = float(single_cost.min()), float(single_cost.max())
    best = int(np.argmax(single_q))
    best_cost, best_q = float(single_cost[best]), float(single_q[best])

    # Models of one mean cost (to rounding: the sweep sums in another order) leave no interval to
    # integrate over; the AIQ is then the best quality the curve reaches, not `at(hi)`, which is 0
    # when the curve's first vertex lands a rounding step above `hi`.
    flat = math.isclose(hi, lo, rel_tol=1e-9, abs_tol=1e-15)

    def aiq(curve: Curve) -> float:
        return float(curve.quality.max()) if flat else curve.area(lo, hi) / (hi - lo)

    w, r_cost, r_q = sweep(q_pred, c_pred, score, cost, c_ref)
    router = hull(r_cost, r_q)
    _, o_cost, o_q = sweep(score, cost, score, cost, c_ref)
    oracle = hull(o_cost, o_q)
    zero = hull(single_cost, single_q)
    aiq_r, aiq_o, aiq_z = aiq(router), aiq(oracle), aiq(zero)
    match = router.cost_to_reach(best_q)

    per_model_ece = {mod: ece(q_pred[:, j], score[:, j]) for j, mod in enumerate(models)}
    per_model_cost_mae = {
        mod: float(np.abs(c_pred[:, j] - cost[:, j]).mean()) for j, mod in enumerate(models)
    }
    figures: dict = {
        "prompts": int(n),
        "models": int(m),
        "c_ref_usd": c_ref,
        "best_model": models[best],
        "best_model_quality": best_q,
        "best_model_cost_per_1k": best_cost * 1000,
        "aiq": aiq_r,
        "aiq_zero": aiq_z,
        "aiq_oracle": aiq_o,
        "gap_closed": (aiq_r - aiq_z) / (aiq_o - aiq_z) if aiq_o > aiq_z else 0.0,
        "quality_at_10pct_cost": router.at(0.1 * best_cost),
        "quality_at_30pct_cost": router.at(0.3 * best_cost),
        # a share of the best model's cost, undefined where that model is free
        "cost_to_match_best": None if match is None or best_cost <= 0 else match / best_cost,
        "quality_at_w0": float(r_q[0]),
        "cost_per_1k_at_w0": float(r_cost[0]) * 1000,
        "oracle_quality": float(o_q[0]),
        "random": {
            "quality": float(score.mean()),
            "cost_per_1k": float(cost.mean()) * 1000,
        },
        "single_models": {
            mod: {"quality": float(single_q[j]), "cost_per_1k": float(single_cost[j]) * 1000}
            for j, mod in enumerate(models)
        },
        "calibration": {
            "quality_ece": ece(q_pred, score),
            "quality_ece_per_model": per_model_ece,
            "cost_mae_usd": float(np.abs(c_pred - cost).mean()),
            "cost_mae_usd_per_model": per_model_cost_mae,
            # over the calls that cost something: a free call has no percentage to be off by
            "cost_mean_abs_pct_error": _pct_error(c_pred, cost),
        },
    }
    if m == 2:
        strong = models.index(strong_model) if strong_model else best
        weak = 1 - strong
        figures["pair"] = {
            "strong_model": models[strong],
            "weak_model": models[weak],
            **pair_metrics(q_pred[:, strong] - q_pred[:, weak], score[:, strong], score[:, weak]),
        }
    return Evaluation(
        figures=figures,
        router_points=np.column_stack([w, r_cost, r_q]),
        router_curve=router,
        oracle_curve=oracle,
        zero_curve=zero,
        single={mod: (float(single_cost[j]), float(single_q[j])) for j, mod in enumerate(models)},
    )
