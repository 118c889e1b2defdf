"""`router train`: routing table -> embeddings -> heads -> presets -> verified bundle.

Each stage is timed; the durations go into the manifest and docs/BENCHMARKS.md. Validation is
carved out of `train` (never `test`): it picks the number of boosting rounds and calibrates the
presets, then the heads are refitted on all of `train` with those round counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from router.bundle import Manifest
from router.embedder import Embedder
from router.features import build_features, extra_features
from router.policy import choose
from training.bundle_writer import BundleContents, write_bundle
from training.embed_cache import EmbeddingCache
from training.embedder_export import cached_export
from training.heads import HeadParams, fit_heads
from training.metrics import W_GRID, evaluate
from training.settings import TrainSettings
from training.tables import RoutingTable, carve_validation, complete_rows, load_table
from training.targets import build_targets, fit_token_estimator

log = logging.getLogger(__name__)

# Named operating points: target mean cost as a fraction of the most accurate single model's.
PRESET_COST_FRACTIONS = {"cost-10": 0.10, "cost-30": 0.30, "cost-50": 0.50}
DEFAULT_PRESET = "cost-30"


@dataclass(frozen=True)
class TrainConfig:
    profile: str = "default"
    precision: str = "int8"
    validation_fraction: float = 0.15
    seed: int = 0
    # For quick runs and tests: train on at most this many prompts of `train`.
    max_prompts: int | None = None


class StageTimer:
    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        log.info("stage %s ...", name)
        yield
        self.durations[name] = round(time.perf_counter() - started, 2)
        log.info("stage %s done in %.1f s", name, self.durations[name])


@dataclass
class Featurized:
    """A table's prompts turned into head features through the one feature code path."""

    table: RoutingTable
    features: np.ndarray
    word_pieces: np.ndarray
    chars: np.ndarray


def featurize(table: RoutingTable, embedder: Embedder, cache: EmbeddingCache) -> Featurized:
    texts = list(table.prompts["prompt"])
    tokens = embedder.tokenize(texts)
    embeddings = cache.embed(texts)
    features = build_features(embeddings, extra_features(texts, tokens, embedder.max_tokens))
    return Featurized(
        table,
        features,
        np.array([t.full_tokens for t in tokens], dtype=float),
        np.array([len(t) for t in texts], dtype=float),
    )


def calibrate_presets(
    q_pred: np.ndarray, c_pred: np.ndarray, score: np.ndarray, cost: np.ndarray, c_ref: float
) -> dict[str, dict]:
    """For each preset, the smallest w whose decisions on validation cost at most the target."""
    best = int(np.argmax(score.mean(axis=0)))
    best_cost = float(cost[:, best].mean())
    rows = np.arange(len(score))
    costs = np.array([cost[rows, choose(q_pred, c_pred, float(w), c_ref)].mean() for w in W_GRID])
    presets = {
        "quality": {"cost_weight": 0.0, "description": "ignore cost: the highest predicted quality"},
    }
    for name, fraction in PRESET_COST_FRACTIONS.items():
        fits = np.nonzero(costs <= fraction * best_cost)[0]
        w = float(W_GRID[fits[0]]) if fits.size else 1.0
        presets[name] = {
            "cost_weight": round(w, 8),
            "description": f"mean cost about {int(fraction * 100)}% of the most accurate single model's "
            "(calibrated on validation)",
        }
    return presets


def train_bundle(
    data_dir: Path, out_dir: Path, config: TrainConfig | None = None, settings: TrainSettings | None = None
) -> Manifest:
    config = config or TrainConfig()
    settings = settings or TrainSettings()
    timer = StageTimer()
    with timer.stage("load"):
        table = load_table(data_dir).split("train")
        if config.max_prompts and len(table.prompts) > config.max_prompts:
            keep = table.prompts.sample(n=config.max_prompts, random_state=config.seed)["prompt_id"]
            table = table.subset(keep)
        _, val_table = carve_validation(table, config.validation_fraction, config.seed)
    with timer.stage("embedder"):
        exported = cached_export(settings.cache_dir, precision=config.precision)
        embedder = Embedder(exported.onnx_path, exported.tokenizer_path, threads=settings.threads)
        cache = EmbeddingCache(settings.cache_dir, embedder)
    with timer.stage("embed"):
        full = featurize(table, embedder, cache)
    with timer.stage("targets"):
        est, est_mae, est_source = fit_token_estimator(
            full.word_pieces, full.chars, build_targets(table, full.word_pieces).input_tokens
        )
        targets = build_targets(table, est.estimate(full.word_pieces, full.chars))
        is_val = table.prompts["prompt_id"].isin(set(val_table.prompts["prompt_id"])).to_numpy()
        c_ref = float(np.nanmean(np.nanmean(table.matrix("cost_usd"), axis=0)))
    params = HeadParams(seed=config.seed)
    with timer.stage("heads_validation"):
        heads = fit_heads(
            table.models,
            full.features[~is_val],
            targets.score[~is_val],
            targets.output_tokens[~is_val],
            full.features[is_val],
            targets.score[is_val],
            targets.output_tokens[is_val],
            params,
        )
        q_val, o_val = heads.predict(full.features[is_val])
        in_val = est.estimate(full.word_pieces[is_val], full.chars[is_val])
        prices = _prices(table)
        c_val = prices.cost_usd(in_val, o_val)
        complete = complete_rows(val_table)
        val_score = val_table.matrix("score")[complete]
        val_cost = val_table.matrix("cost_usd")[complete]
        presets = calibrate_presets(q_val[complete], c_val[complete], val_score, val_cost, c_ref)
        val_eval = evaluate(table.models, val_score, val_cost, q_val[complete], c_val[complete], c_ref)
    with timer.stage("heads_refit"):
        heads = fit_heads(
            table.models,
            full.features,
            targets.score,
            targets.output_tokens,
            full.features[:0],
            targets.score[:0],
            targets.output_tokens[:0],
            params,
            rounds=heads.rounds,
        )
    with timer.stage("export"):
        f = val_eval.figures
        contents = BundleContents(
            table=table,
            embedder=embedder,
            exported=exported,
            heads=heads,
            n_features=full.features.shape[1],
            token_estimator=est,
            token_estimator_mae=est_mae,
            token_estimator_source=est_source,
            output_tokens_known=targets.output_tokens_known,
            c_ref=c_ref,
            presets=presets,
            default_preset=DEFAULT_PRESET,
            training={
                "profile": config.profile,
                "table": table.name,
                "data_dir": str(data_dir),
                "data_fingerprint": table.fingerprint(),
                "train_prompts": len(table.prompts),
                "validation_prompts": int(is_val.sum()),
                "outcome_rows": len(table.outcomes),
                "validation_fraction": config.validation_fraction,
                "seed": config.seed,
                "head_params": params.__dict__,
                "boosting_rounds": heads.rounds,
                "validation_metrics": {
                    k: f[k] for k in ("aiq", "aiq_zero", "aiq_oracle", "gap_closed", "quality_at_w0")
                }
                | {
                    "quality_ece": f["calibration"]["quality_ece"],
                    "cost_mae_usd": f["calibration"]["cost_mae_usd"],
                },
            },
            check_features=full.features[is_val][:64],
        )
        manifest = write_bundle(out_dir, contents, timer.durations)
    log.info("bundle %s written to %s (stages: %s)", manifest.bundle_version, out_dir, timer.durations)
    return manifest


def _prices(table: RoutingTable):
    from router.pricing import Prices

    return Prices.from_rows(
        list(table.prices[["model", "input_usd_per_mtok", "output_usd_per_mtok"]].itertuples(index=False))
    )
