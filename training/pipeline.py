"""`router train`, as its stages: data -> features -> targets -> fit -> validate -> refit -> export.

Each stage is a function with a typed result that can be run and tested on its own; `train_bundle`
runs them in order and times each (the durations go into the manifest and docs/BENCHMARKS.md).
Validation is carved out of `train` (never `test`): the heads are fitted on the rest, exported,
and run by the engine on it, which picks the boosters' rounds, measures the heads and calibrates
the presets; then the heads are refitted on all of `train` with those rounds and exported again.

The prompt is represented by the frozen all-MiniLM-L6-v2 encoder (int8 by default). Fine-tuning
the encoder on the routing labels was measured and did not pay for itself (docs/BENCHMARKS.md), so
there is one configuration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from router.core.embedder import Embedder
from router.core.features import PromptFeatures, featurize
from router.core.manifest import Manifest, ModelSpec, TokenEstimatorSpec, TrainingSpec
from router.core.pricing import Prices, TokenEstimator
from training.bundle_writer import BundleContents, write_bundle
from training.embed_cache import EmbeddingCache
from training.embedder_export import ExportedEmbedder, cached_export
from training.errors import TableError
from training.feedback_data import FeedbackRows, load_feedback
from training.heads_model import KIND, HeadsModel, HeadsParams
from training.reference import CALIBRATION_PROMPTS, Reference, prompt_key
from training.settings import TrainSettings
from training.tables import RoutingTable, carve_validation, latency_of, load_table
from training.targets import Targets, build_targets, fit_token_estimator
from training.validation import Validated, validate

log = logging.getLogger(__name__)

# One configuration for every table: chosen on validation carved from `train` (docs/BENCHMARKS.md).
HEADS = HeadsParams()
# Validation prompts the exported heads are checked against the trained ones on.
PARITY_CHECK_PROMPTS = 256


@dataclass(frozen=True)
class TrainConfig:
    precision: str = "int8"
    validation_fraction: float = 0.15
    seed: int = 0
    # For quick runs and tests: train on at most this many prompts of `train`.
    max_prompts: int | None = None
    # Models of the table left out (the leave-one-model-out benchmark trains without each in turn).
    exclude_models: tuple[str, ...] = ()
    # A feedback store whose outcomes join the fitted rows (training/feedback_data.py).
    feedback: str | None = None


@dataclass(frozen=True)
class TrainingData:
    data_dir: Path
    table: RoutingTable  # the train split (or a sample of it)
    validation: RoutingTable  # carved out of `table`
    is_val: np.ndarray  # which rows of `table` are in `validation`


@dataclass(frozen=True)
class Encoded:
    exported: ExportedEmbedder
    embedder: Embedder
    features: PromptFeatures  # rows as `TrainingData.table`'s prompts


@dataclass(frozen=True)
class Prepared:
    targets: Targets
    feedback: FeedbackRows | None
    token_estimator: TokenEstimator
    token_map: TokenEstimatorSpec  # the same map, with how well it fits, as the manifest records it
    prices: Prices
    c_ref: float


def load_data(data_dir: Path, config: TrainConfig) -> TrainingData:
    table = load_table(data_dir).without_models(config.exclude_models).split("train").scored()
    if config.max_prompts and len(table.prompts) > config.max_prompts:
        keep = table.prompts.sample(n=config.max_prompts, random_state=config.seed)["prompt_id"]
        table = table.subset(keep)
    _, validation = carve_validation(table, config.validation_fraction, config.seed)
    is_val = table.prompts["prompt_id"].isin(set(validation.prompts["prompt_id"])).to_numpy()
    return TrainingData(Path(data_dir), table, validation, is_val)


def encode(data: TrainingData, config: TrainConfig, settings: TrainSettings) -> Encoded:
    """The table's prompts through the shared embedder and feature code (embeddings cached on disk)."""
    exported = cached_export(settings.cache_dir, precision=config.precision)
    embedder = Embedder(exported.onnx_path, exported.tokenizer_path, threads=settings.threads)
    texts = list(data.table.prompts["prompt"])
    embeddings = EmbeddingCache(settings.cache_dir, embedder).embed(texts)
    features = featurize(texts, embedder.tokenize(texts), embeddings, embedder.max_tokens)
    return Encoded(exported, embedder, features)


def prepare(data: TrainingData, encoded: Encoded, feedback: str | None = None) -> Prepared:
    """Targets (scores, billed output tokens), the input token map, prices and the cost scale."""
    f, table = encoded.features, data.table
    estimator, mae, source = fit_token_estimator(
        f.word_pieces, f.chars, build_targets(table, f.word_pieces).input_tokens
    )
    token_map = TokenEstimatorSpec(
        intercept=estimator.intercept,
        per_word_piece=estimator.per_word_piece,
        per_char=estimator.per_char,
        mean_abs_error_tokens=mae,
        source=source,
    )
    prices = Prices.from_rows(
        list(table.prices[["model", "input_usd_per_mtok", "output_usd_per_mtok"]].itertuples(index=False))
    )
    costs = table.matrix("cost_usd")
    if np.isnan(costs).all():
        raise TableError(
            f"{table.name}: no outcome records cost_usd, nor input_tokens to price at the list prices: "
            "the router trades quality against cost, so one of them is needed"
        )
    c_ref = float(np.nanmean(np.nanmean(costs, axis=0)))
    if c_ref <= 0:  # a fleet that costs nothing: any positive scale makes the same decisions
        c_ref = 1.0
    targets = build_targets(table, estimator.estimate(f.word_pieces, f.chars))
    rows = load_feedback(feedback, table.models, f.features.shape[1]) if feedback else None
    if rows is not None:
        log.info("feedback: %d prompts, %d outcomes join the fitted rows", len(rows), rows.outcomes)
    return Prepared(targets, rows, estimator, token_map, prices, c_ref)


def fit_heads(
    data: TrainingData,
    encoded: Encoded,
    prepared: Prepared,
    rows: np.ndarray,
    *,
    rounds: list[int] | None = None,
) -> HeadsModel:
    """Heads fitted on `rows` of the table (and the feedback rows); with `rounds` None, early
    stopping on validation."""
    x, t = encoded.features.features, prepared.targets
    fx, fs, ft = x[rows], t.score[rows], t.output_tokens[rows]
    extra = prepared.feedback
    if extra is not None and len(extra):
        fx = np.vstack([fx, extra.features])
        fs, ft = np.vstack([fs, extra.score]), np.vstack([ft, extra.output_tokens])
    return HeadsModel.fit(
        data.table.models,
        fx,
        fs,
        ft,
        encoded.embedder.dim,
        HEADS,
        validation=(x[data.is_val], t.output_tokens[data.is_val]) if rounds is None else None,
        rounds=rounds,
    )


def validate_heads(data: TrainingData, encoded: Encoded, prepared: Prepared, heads: HeadsModel) -> Validated:
    """The exported graph of `heads` (fitted without validation), run by the engine on validation."""
    val_features = encoded.features.rows(data.is_val)
    graph = heads.export(val_features.features[:PARITY_CHECK_PROMPTS])
    p = prepared
    return validate(
        graph, encoded.embedder, p.prices, p.token_estimator, p.c_ref, data.validation, val_features
    )


def export(
    out_dir: Path,
    config: TrainConfig,
    data: TrainingData,
    encoded: Encoded,
    prepared: Prepared,
    heads: HeadsModel,
    validated: Validated,
    durations: dict[str, float],
) -> Manifest:
    check = encoded.features.features[data.is_val][:PARITY_CHECK_PROMPTS]
    table = data.table
    training = TrainingSpec(
        table=table.name,
        data_dir=str(data.data_dir),
        data_fingerprint=table.fingerprint(),
        train_prompts=len(table.prompts),
        validation_prompts=int(data.is_val.sum()),
        outcome_rows=len(table.outcomes),
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        heads_params=HEADS.as_dict(),
        output_head_rounds=dict(zip(table.models, heads.boosters.rounds, strict=True)),
        validation_metrics=validated.figures,
        durations_s=durations,
        feedback_outcomes=prepared.feedback.outcomes if prepared.feedback else 0,
    )
    models = [
        ModelSpec(
            name=row.model,
            ttft_ms=latency_of(row._asdict())["ttft_ms"],
            tpot_ms=latency_of(row._asdict())["tpot_ms"],
            input_usd_per_mtok=float(row.input_usd_per_mtok),
            output_usd_per_mtok=float(row.output_usd_per_mtok),
            output_tokens_known=prepared.targets.output_tokens_known[row.model],
            price_source=str(row.price_source),
        )
        for row in table.prices.itertuples(index=False)
    ]
    validation_rows = np.nonzero(data.is_val)[0]
    step = max(1, len(validation_rows) // CALIBRATION_PROMPTS)
    reference = Reference(
        list(table.models),
        [prompt_key(t) for t in table.prompts["prompt"]],
        prepared.targets.score,
        prepared.targets.output_tokens,
        encoded.features.rows(validation_rows[::step][:CALIBRATION_PROMPTS]),
    )
    contents = BundleContents(
        table_name=table.name,
        embedder=encoded.embedder,
        exported=encoded.exported,
        heads_graph=heads.export(check),
        heads_kind=KIND,
        models=models,
        token_estimator=prepared.token_map,
        policy=validated.policy,
        training=training,
        reference=reference,
    )
    return write_bundle(out_dir, contents)


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


def train_bundle(
    data_dir: Path, out_dir: Path, config: TrainConfig | None = None, settings: TrainSettings | None = None
) -> Manifest:
    config = config or TrainConfig()
    settings = settings or TrainSettings()
    timer = StageTimer()
    with timer.stage("load"):
        data = load_data(data_dir, config)
    with timer.stage("embed"):
        encoded = encode(data, config, settings)
    with timer.stage("targets"):
        prepared = prepare(data, encoded, config.feedback)
    with timer.stage("heads_validation"):
        on_fit = fit_heads(data, encoded, prepared, ~data.is_val)
        validated = validate_heads(data, encoded, prepared, on_fit)
    with timer.stage("heads_refit"):
        heads = fit_heads(
            data, encoded, prepared, np.ones(len(data.is_val), dtype=bool), rounds=on_fit.boosters.rounds
        )
    with timer.stage("export"):
        manifest = export(out_dir, config, data, encoded, prepared, heads, validated, timer.durations)
    log.info("bundle %s written to %s (stages: %s)", manifest.bundle_version, out_dir, timer.durations)
    return manifest
