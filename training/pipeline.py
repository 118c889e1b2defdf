"""`router train`: routing table -> embeddings -> heads -> presets -> verified bundle.

Each stage is timed; the durations go into the manifest and docs/BENCHMARKS.md. Validation is
carved out of `train` (never `test`): it picks the boosting rounds of the output-length heads,
measures the heads and calibrates the presets; then the heads are refitted on all of `train`.

The prompt is represented by the frozen all-MiniLM-L6-v2 encoder (int8 by default). Quality comes
from the blend of an MLP ensemble and a neighbour memory (training/quality_model.py), output
lengths from the mean of per-model LightGBM and the same neighbours' output lengths. Fine-tuning
the encoder on the routing labels was measured and did not pay for itself (docs/BENCHMARKS.md), so
there is one configuration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from router.bundle import Manifest
from router.embedder import Embedder
from router.features import build_features, extra_features
from router.policy import choose
from router.pricing import Prices
from training.bundle_writer import BundleContents, write_bundle
from training.embed_cache import EmbeddingCache
from training.embedder_export import cached_export
from training.heads import HeadParams, fit_per_model
from training.metrics import W_GRID, evaluate
from training.onnx_heads import assemble, per_model_part
from training.quality_model import BlendParams, QualityBlend
from training.settings import TrainSettings
from training.tables import RoutingTable, carve_validation, complete_rows, load_table
from training.targets import build_targets, fit_token_estimator

log = logging.getLogger(__name__)

# Named operating points: target mean cost as a fraction of the most accurate single model's.
PRESET_COST_FRACTIONS = {"cost-10": 0.10, "cost-30": 0.30, "cost-50": 0.50}
DEFAULT_PRESET = "cost-30"


# One configuration for every table: chosen on validation carved from `train` (docs/BENCHMARKS.md).
BLEND = BlendParams()
OUTPUT_HEADS = HeadParams()
# Validation prompts the exported heads are checked against the trained ones on.
PARITY_CHECK_PROMPTS = 256
# Output length = this share of the neighbours' mean + the rest of LightGBM's prediction.
NEIGHBOUR_TOKENS_WEIGHT = 0.5


def output_tokens(trees: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """The output-length estimate, as the heads graph computes it."""
    return (1.0 - NEIGHBOUR_TOKENS_WEIGHT) * trees + NEIGHBOUR_TOKENS_WEIGHT * neighbours


@dataclass(frozen=True)
class TrainConfig:
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

    features: np.ndarray
    word_pieces: np.ndarray
    chars: np.ndarray


def featurize(table: RoutingTable, embedder: Embedder, cache: EmbeddingCache) -> Featurized:
    texts = list(table.prompts["prompt"])
    tokens = embedder.tokenize(texts)
    features = build_features(cache.embed(texts), extra_features(texts, tokens, embedder.max_tokens))
    return Featurized(
        features,
        np.array([t.full_tokens for t in tokens], dtype=float),
        np.array([len(t) for t in texts], dtype=float),
    )


def table_prices(table: RoutingTable) -> Prices:
    return Prices.from_rows(
        list(table.prices[["model", "input_usd_per_mtok", "output_usd_per_mtok"]].itertuples(index=False))
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
        is_val = table.prompts["prompt_id"].isin(set(val_table.prompts["prompt_id"])).to_numpy()
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
        c_ref = float(np.nanmean(np.nanmean(table.matrix("cost_usd"), axis=0)))
        prices = table_prices(table)
    x, dim = full.features, embedder.dim
    with timer.stage("heads_validation"):
        blend = QualityBlend.fit(
            x[~is_val], targets.score[~is_val], targets.output_tokens[~is_val], dim, BLEND
        )
        outputs = fit_per_model(
            "poisson",
            table.models,
            x[~is_val],
            targets.output_tokens[~is_val],
            x[is_val],
            targets.output_tokens[is_val],
            OUTPUT_HEADS,
        )
        q_val, near_tokens = blend.predict(x[is_val])
        c_val = prices.cost_usd(
            est.estimate(full.word_pieces[is_val], full.chars[is_val]),
            output_tokens(outputs.predict(x[is_val]), near_tokens),
        )
        complete = complete_rows(val_table)
        val_score = val_table.matrix("score")[complete]
        val_cost = val_table.matrix("cost_usd")[complete]
        presets = calibrate_presets(q_val[complete], c_val[complete], val_score, val_cost, c_ref)
        val_eval = evaluate(table.models, val_score, val_cost, q_val[complete], c_val[complete], c_ref)
    with timer.stage("heads_refit"):
        blend = QualityBlend.fit(x, targets.score, targets.output_tokens, dim, BLEND)
        outputs = fit_per_model(
            "poisson",
            table.models,
            x,
            targets.output_tokens,
            x[:0],
            targets.output_tokens[:0],
            OUTPUT_HEADS,
            rounds=outputs.rounds,
        )
    with timer.stage("export"):
        blend_part = blend.to_onnx()
        trees_part = per_model_part(outputs.heads, x.shape[1])
        graph = assemble(
            x.shape[1],
            len(table.models),
            quality=[(blend_part, "quality", 1.0)],
            output_tokens=[
                (trees_part, "columns", 1.0 - NEIGHBOUR_TOKENS_WEIGHT),
                (blend_part, "neighbour_output_tokens", NEIGHBOUR_TOKENS_WEIGHT),
            ],
        )
        check = x[is_val][:PARITY_CHECK_PROMPTS]
        q_check, near_check = blend.predict(check)
        f = val_eval.figures
        contents = BundleContents(
            table=table,
            embedder=embedder,
            exported=exported,
            heads_graph=graph,
            heads_kind=HEADS_KIND,
            reference=(check, q_check, output_tokens(outputs.predict(check), near_check)),
            token_estimator=est,
            token_estimator_mae=est_mae,
            token_estimator_source=est_source,
            output_tokens_known=targets.output_tokens_known,
            c_ref=c_ref,
            presets=presets,
            default_preset=DEFAULT_PRESET,
            training={
                "table": table.name,
                "data_dir": str(data_dir),
                "data_fingerprint": table.fingerprint(),
                "train_prompts": len(table.prompts),
                "validation_prompts": int(is_val.sum()),
                "outcome_rows": len(table.outcomes),
                "validation_fraction": config.validation_fraction,
                "seed": config.seed,
                "heads_params": {
                    "quality": asdict(BLEND),
                    "output_tokens": asdict(OUTPUT_HEADS),
                    "neighbour_tokens_weight": NEIGHBOUR_TOKENS_WEIGHT,
                },
                "output_head_rounds": dict(zip(table.models, outputs.rounds, strict=True)),
                "validation_metrics": {
                    k: f[k] for k in ("aiq", "aiq_zero", "aiq_oracle", "gap_closed", "quality_at_w0")
                }
                | {
                    "quality_ece": f["calibration"]["quality_ece"],
                    "cost_mae_usd": f["calibration"]["cost_mae_usd"],
                },
            },
        )
        manifest = write_bundle(out_dir, contents, timer.durations)
    log.info("bundle %s written to %s (stages: %s)", manifest.bundle_version, out_dir, timer.durations)
    return manifest


HEADS_KIND = (
    "quality: blend of an MLP ensemble and a k-nearest-neighbour mean, with a near-duplicate kernel; "
    "output tokens: mean of per-model LightGBM (Poisson) and the nearest training prompts' output lengths"
)
