"""`router eval`: every figure of METRICS.md for a bundle, beside the kNN reference, in one run.

Writes metrics.json, curve.png (the router's cost/quality curve against the references) and
report.md into the report directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from router.core.engine import open_engine
from training.embed_cache import EmbeddingCache
from training.knn import K_CHOICES, KnnRouter
from training.metrics import Evaluation, evaluate
from training.settings import TrainSettings
from training.tables import RoutingTable, TableError, carve_validation, complete_rows, load_table

log = logging.getLogger(__name__)


def knn_baseline(
    train: RoutingTable, test_embeddings: np.ndarray, cache: EmbeddingCache, c_ref: float
) -> tuple[np.ndarray, np.ndarray, int, dict[int, float]]:
    """Predictions of the kNN router on the test prompts, k chosen by AIQ on validation carved from
    `train`. Training prompts' embeddings come from the cache: the embedder computes each prompt
    alone, so a cached embedding is the one the engine would compute."""
    fit, val = carve_validation(train)
    emb_fit = cache.embed(list(fit.prompts["prompt"]))
    emb_val = cache.embed(list(val.prompts["prompt"]))
    models = train.models  # the carved parts in train's columns, even where one lacks a model
    complete = complete_rows(val, models)
    s_val, c_val = val.matrix("score", models)[complete], val.matrix("cost_usd", models)[complete]
    s_fit, c_fit = fit.matrix("score", models), fit.matrix("cost_usd", models)
    scores = {}
    for k in K_CHOICES if complete.any() else ():
        q, c = KnnRouter(emb_fit, s_fit, c_fit, k).predict(emb_val[complete])
        scores[k] = evaluate(models, s_val, c_val, q, c, c_ref).figures["aiq"]
    # With no validation prompt that every model answered there is nothing to choose k by (and
    # the AIQs would be NaN, which is not JSON): the middle of the choices, and no scores.
    best_k = max(scores, key=lambda k: scores[k]) if scores else K_CHOICES[len(K_CHOICES) // 2]
    knn = KnnRouter(
        cache.embed(list(train.prompts["prompt"])), train.matrix("score"), train.matrix("cost_usd"), best_k
    )
    q_test, c_test = knn.predict(test_embeddings)
    return q_test, c_test, best_k, scores


def evaluate_bundle(bundle_dir: Path, data_dir: Path, split: str, report_dir: Path) -> dict:
    settings = TrainSettings()
    bundle, engine = open_engine(bundle_dir, provider="cpu")
    table = load_table(data_dir)
    models = list(engine.models)
    unscored = sorted(set(models) - set(table.models))
    if unscored:
        raise TableError(
            f"{table.name}: has no outcomes of the bundle's model(s) {', '.join(map(repr, unscored[:3]))}; "
            "evaluate on a table that scores every model of the bundle"
        )
    # A bundle after remove-model (or trained without some models) is measured among its own
    # models: the router, the references and the oracle all choose from the same fleet.
    left_out = sorted(set(table.models) - set(models))
    if left_out:
        log.warning(
            "%s: evaluating among the bundle's %d models; the table's %s are left out",
            table.name,
            len(models),
            ", ".join(left_out),
        )
        table = table.without_models(left_out)
    train, test = table.split("train").scored(), table.split(split)
    order = [table.models.index(m) for m in models]
    features = engine.featurize(list(test.prompts["prompt"]))
    est = engine.estimate_features(features)
    complete = complete_rows(test)
    if not complete.any():
        raise TableError(
            f"{table.name}: no {split} prompt has a score and a cost for every model; nothing to evaluate"
        )
    score = test.matrix("score")[:, order][complete]
    cost = test.matrix("cost_usd")[:, order][complete]
    c_ref = engine.policy.c_ref_usd
    strong = _strong_model(train, models)
    router = evaluate(models, score, cost, est.quality[complete], est.cost_usd[complete], c_ref, strong)

    cache = EmbeddingCache(settings.cache_dir, bundle.embedder)
    dim = bundle.embedder.dim
    q_knn, c_knn, k, k_scores = knn_baseline(train, features.features[:, :dim], cache, c_ref)
    knn = evaluate(models, score, cost, q_knn[:, order][complete], c_knn[:, order][complete], c_ref, strong)
    figures = {
        "table": table.name,
        "split": split,
        "bundle_version": engine.version,
        "models_left_out": left_out,
        "router": router.figures,
        "knn": knn.figures | {"k": k, "validation_aiq_by_k": {str(kk): v for kk, v in k_scores.items()}},
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    plot_curves(router, knn, report_dir / "curve.png", f"{table.name} ({split})")
    (report_dir / "report.md").write_text(markdown_report(figures), encoding="utf-8")
    return figures


def _strong_model(train: RoutingTable, models: list[str]) -> str | None:
    """For two-model tables: the model with the higher mean score on train."""
    if len(models) != 2:
        return None
    means = np.nanmean(train.matrix("score"), axis=0)
    return train.models[int(np.argmax(means))]


def plot_curves(router: Evaluation, knn: Evaluation, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    scale = 1000.0
    for curve, label, style in (
        (router.oracle_curve, "oracle", dict(color="0.6", ls=":")),
        (router.router_curve, "router (this bundle)", dict(color="C0", lw=2)),
        (knn.router_curve, "kNN reference", dict(color="C1", ls="--")),
        (router.zero_curve, "zero router (mix of single models)", dict(color="C2", ls="-.")),
    ):
        xs = np.append(curve.cost, max(curve.cost[-1], max(c for c, _ in router.single.values())))
        ys = np.append(curve.quality, curve.quality[-1])
        ax.plot(xs * scale, ys, label=label, **style)
    for name, (c, q) in router.single.items():
        ax.scatter([c * scale], [q], color="k", s=12, zorder=3)
        ax.annotate(name, (c * scale, q), fontsize=6, xytext=(3, -3), textcoords="offset points")
    rnd = router.figures["random"]
    ax.scatter(
        [rnd["cost_per_1k"]], [rnd["quality"]], marker="x", color="C3", label="random router", zorder=3
    )
    if max(c for c, _ in router.single.values()) > 0:  # a fleet that costs nothing has no log axis
        ax.set_xscale("log")
        ax.set_xlabel("mean cost, USD per 1,000 queries (log scale)")
    else:
        ax.set_xlabel("mean cost, USD per 1,000 queries")
    ax.set_ylabel("mean quality")
    ax.set_title(
        f"{title}: gap closed {router.figures['gap_closed']:.3f} (kNN {knn.figures['gap_closed']:.3f})"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_report(f: dict) -> str:
    r, k = f["router"], f["knn"]
    rows = [
        ("AIQ", "aiq"),
        ("gap closed", "gap_closed"),
        ("quality at 10% of best model's cost", "quality_at_10pct_cost"),
        ("quality at 30% of best model's cost", "quality_at_30pct_cost"),
        ("cost to match best model (fraction of its cost)", "cost_to_match_best"),
        ("quality at w = 0", "quality_at_w0"),
    ]
    lines = [
        f"# {f['table']} ({f['split']} split): bundle {f['bundle_version']}",
        "",
        f"{r['prompts']} prompts that every one of the {r['models']} models answered. "
        f"Best single model: {r['best_model']} (quality {r['best_model_quality']:.3f}, "
        f"${r['best_model_cost_per_1k']:.4f} per 1k queries). "
        f"kNN reference: k = {k['k']} (chosen on validation)."
        + (
            f" The table's other models ({', '.join(f['models_left_out'])}) are not the bundle's: left out."
            if f.get("models_left_out")
            else ""
        ),
        "",
        "| figure | router | kNN reference |",
        "|---|---|---|",
        *[f"| {label} | {_fmt(r[key])} | {_fmt(k[key])} |" for label, key in rows],
        f"| quality ECE | {_fmt(r['calibration']['quality_ece'])} | "
        f"{_fmt(k['calibration']['quality_ece'])} |",
        f"| cost MAE, USD per 1k queries | {_fmt(r['calibration']['cost_mae_usd'] * 1000, 5)} | "
        f"{_fmt(k['calibration']['cost_mae_usd'] * 1000, 5)} |",
        "",
        f"Zero router AIQ {r['aiq_zero']:.4f}; oracle AIQ {r['aiq_oracle']:.4f} (oracle quality "
        f"{r['oracle_quality']:.3f}); random router quality {r['random']['quality']:.3f} at "
        f"${r['random']['cost_per_1k']:.4f} per 1k.",
        "",
    ]
    if min(r["quality_at_10pct_cost"], k["quality_at_10pct_cost"]) == 0.0:
        lines[-1:-1] = [
            "",
            "A quality of 0 at a cost fraction means no operating point is that cheap (METRICS.md: the "
            "curve is 0 before its first point).",
        ]
    if "pair" in r:
        p, kp = r["pair"], k["pair"]
        lines += [
            f"Two models: strong {p['strong_model']}, weak {p['weak_model']}.",
            "",
            "| figure | router | kNN reference | random |",
            "|---|---|---|---|",
            f"| APGR | {_fmt(p['apgr'])} | {_fmt(kp['apgr'])} | 0.500 |",
            f"| CPT(50%) | {_fmt(p['cpt50'])} | {_fmt(kp['cpt50'])} | 0.500 |",
            f"| CPT(80%) | {_fmt(p['cpt80'])} | {_fmt(kp['cpt80'])} | 0.800 |",
            "",
        ]
    lines += ["![cost/quality curve](curve.png)", ""]
    return "\n".join(lines)
