"""The fleet changes, the bundle follows: choose anchors, add a model, remove one, reprice, without
retraining.

Each change writes a new bundle version through `bundle_writer.rewrite_bundle` (checksums, a
self-check, published only once it loads as the service would load it), which a running server
takes with its hot swap. The heads graph is the old one followed by a column edit
(`onnx_graph.chain`): the old models' columns come out of the same operators, and each change
checks that they are unchanged, bit for bit, on the bundle's calibration prompts before writing.
Presets and c_ref are then recalibrated on those prompts (`recalibrated_policy`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import pandas as pd

from router.core.bundle import Bundle
from router.core.engine import Engine, Estimates, open_engine
from router.core.features import PromptFeatures
from router.core.heads import Heads
from router.core.manifest import ChangeSpec, Manifest, ModelSpec, PolicySpec, PresetSpec
from router.core.policy import choose
from router.core.pricing import MAX_TOKENS, MAX_USD_PER_MTOK, PER_TOKEN, Prices
from training.added_model import PARITY_TOLERANCE, AddedModel, out_of_fold
from training.bundle_writer import rewrite_bundle
from training.embed_cache import EmbeddingCache
from training.errors import FleetError
from training.metrics import W_GRID, evaluate
from training.onnx_graph import chain, select_columns
from training.reference import Reference, prompt_key
from training.settings import TrainSettings
from training.tables import LATENCY_COLUMNS, PRICE_COLUMNS, load_table, out_of_range, plain
from training.validation import DEFAULT_PRESET, PRESET_COST_FRACTIONS, spend_curve

log = logging.getLogger(__name__)

MIN_SCORED_PROMPTS = 20
# Beyond these a value is a unit slip (USD per token for per million, seconds for milliseconds),
# not a model: refused before it turns into infinite costs or latencies.
MAX_LATENCY_MS = 1e7
HOLDBACK_STEPS = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16, 1.0)
# What `reprice` updates (models.csv's columns).
UPDATABLE = (*PRICE_COLUMNS[1:], *LATENCY_COLUMNS)


# -- anchors -------------------------------------------------------------------------------------


def choose_anchors(bundle_dir: Path, data_dir: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """N prompts of the table's `train` split that describe a new model well: spread over the
    embedding space and representative of it (the prompt nearest each of N k-means centres).

    Representative beats informative here: on validation, choosing the prompts on which the
    bundle's models disagree most (within each cluster, or overall) fitted the new model's relation
    to the others worse than random prompts did, and k-means centres did as well as random ones or
    better (docs/BENCHMARKS.md). Deterministic for a given seed."""
    from sklearn.cluster import KMeans

    bundle = _open(bundle_dir)[0]
    prompts = load_table(data_dir).split("train").prompts
    if n < 1 or n > len(prompts):
        raise FleetError(f"--n must be between 1 and the {len(prompts)} train prompts of the table, got {n}")
    texts = list(prompts["prompt"])
    if len(set(texts)) < n:
        raise FleetError(f"--n {n} is more than the table's {len(set(texts))} distinct train prompts")
    embeddings = EmbeddingCache(TrainSettings().cache_dir, bundle.embedder).embed(texts)
    kmeans = KMeans(n_clusters=n, n_init=1, random_state=seed).fit(embeddings)
    distance = ((embeddings - kmeans.cluster_centers_[kmeans.labels_]) ** 2).sum(axis=1)
    chosen = []
    for cluster in range(n):
        members = np.nonzero(kmeans.labels_ == cluster)[0]
        if len(members):
            chosen.append(members[np.argmin(distance[members])])
    return prompts.iloc[sorted(chosen)][["prompt_id", "prompt"]].reset_index(drop=True)


# -- the changes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """A new model's outcomes on scored prompts, checked."""

    texts: list[str]
    score: np.ndarray
    output_tokens: np.ndarray  # NaN where not known


def read_scored(prompts_path: Path, outcomes_path: Path, model: str) -> Scored:
    _check_name(model)
    prompts = _read_parquet(prompts_path, ("prompt_id", "prompt"))
    outcomes = _read_parquet(outcomes_path, ("prompt_id", "model", "score"))
    if prompts["prompt_id"].duplicated().any():
        dup = prompts.loc[prompts["prompt_id"].duplicated(), "prompt_id"].iloc[0]
        raise FleetError(f"{prompts_path}: duplicate prompt_id {dup!r}")
    bad_text = prompts["prompt"].map(lambda t: not isinstance(t, str) or not t.strip())
    if bad_text.any():
        raise FleetError(f"{prompts_path}: prompt of {prompts.loc[bad_text, 'prompt_id'].iloc[0]!r} is empty")
    mine = outcomes[outcomes["model"] == model]
    if mine.empty:
        found = sorted(map(str, outcomes["model"].unique()))[:5]
        raise FleetError(f"{outcomes_path}: no outcomes of model {model!r} (it has: {', '.join(found)})")
    unknown = sorted(set(mine["prompt_id"]) - set(prompts["prompt_id"]), key=str)
    if unknown:
        raise FleetError(f"{outcomes_path}: prompt_id {unknown[0]!r} is not in {prompts_path}")
    if mine["prompt_id"].duplicated().any():
        dup = mine.loc[mine["prompt_id"].duplicated(), "prompt_id"].iloc[0]
        raise FleetError(f"{outcomes_path}: more than one outcome of {model!r} for prompt_id {dup!r}")
    score = pd.to_numeric(mine["score"], errors="coerce")
    bad = score.isna() | (score < 0) | (score > 1)
    if bad.any():
        raise FleetError(
            f"{outcomes_path}: score must be a number in 0..1, "
            f"found {plain(mine.loc[bad, 'score'].iloc[0])!r} "
            f"for prompt_id {mine.loc[bad, 'prompt_id'].iloc[0]!r}"
        )
    if len(mine) < MIN_SCORED_PROMPTS:
        raise FleetError(
            f"{outcomes_path}: {len(mine)} scored prompts of {model!r}; "
            f"at least {MIN_SCORED_PROMPTS} are needed"
        )
    given = mine.get("output_tokens", pd.Series(np.nan, index=mine.index))
    tokens = pd.to_numeric(given, errors="coerce")
    bad = out_of_range(given, MAX_TOKENS)
    if bad.any():
        raise FleetError(
            f"{outcomes_path}: output_tokens must be a number of tokens from 0 to {MAX_TOKENS:,}, "
            f"found {plain(given[bad].iloc[0])!r} for prompt_id {mine.loc[bad, 'prompt_id'].iloc[0]!r}"
        )
    text_of = dict(zip(prompts["prompt_id"], prompts["prompt"], strict=True))
    return Scored(
        [text_of[pid] for pid in mine["prompt_id"]],
        score.to_numpy(dtype=float),
        tokens.to_numpy(dtype=float, na_value=np.nan),
    )


def add_model(
    bundle_dir: Path,
    out_dir: Path,
    model: str,
    scored: Scored,
    input_usd_per_mtok: float | None,
    output_usd_per_mtok: float | None,
    ttft_ms: float | None = None,
    tpot_ms: float | None = None,
) -> Manifest:
    """A new bundle version with `model`, estimated from its outcomes on the scored prompts."""
    started = time.perf_counter()
    _check_name(model)
    bundle, engine = _open(bundle_dir)
    if model in engine.models:
        raise FleetError(f"model {model!r} is already in bundle {bundle.version}")
    prices = _prices(model, input_usd_per_mtok, output_usd_per_mtok)
    reference = Reference.of_bundle(bundle).select(engine.models)
    estimates = engine.estimate(scored.texts)
    rows = reference.rows_of(scored.texts)
    inside = rows >= 0
    observed_q = np.full_like(estimates.quality, np.nan)
    observed_o = np.full_like(estimates.output_tokens, np.nan)
    observed_q[inside] = reference.score[rows[inside]]
    observed_o[inside] = reference.output_tokens[rows[inside]]
    regressors = np.where(np.isnan(observed_q), estimates.quality, observed_q)
    added = AddedModel.fit(
        regressors,
        scored.score,
        np.where(np.isnan(observed_o), estimates.output_tokens, observed_o),
        scored.output_tokens,
        MIN_SCORED_PROMPTS,
    )
    trained = np.array([spec.origin == "trained" for spec in bundle.manifest.models])
    holdback, gate = _holdback(
        added, regressors, scored, estimates, observed_q, observed_o, trained, prices, engine
    )
    added = added.held_back(holdback)
    old_graph = onnx.load(bundle.root / bundle.manifest.heads.file)
    graph = chain(old_graph, added.to_onnx(len(engine.models)), _tag(bundle)).SerializeToString()
    calibration = reference.calibration
    old_q, old_o = bundle.heads.run(calibration.features)
    new_q, new_o = Heads(graph).run(calibration.features)
    _check_unchanged(old_q, old_o, new_q[:, :-1], new_o[:, :-1])
    q_ref, o_ref = added.predict(old_q, old_o)
    gap = max(
        float(np.abs(new_q[:, -1] - q_ref).max()),
        float((np.abs(new_o[:, -1] - o_ref) / np.maximum(o_ref, 1.0)).max()),
    )
    if gap > PARITY_TOLERANCE:
        raise RuntimeError(f"the added model's graph disagrees with its fit (by {gap:.2g})")
    spec = ModelSpec(
        name=model,
        input_usd_per_mtok=prices[1],
        output_usd_per_mtok=prices[2],
        output_tokens_known=added.tokens is not None,
        price_source="given to add-model",
        origin=f"added from {len(scored.texts)} scored prompts",
        ttft_ms=_latency("ttft_ms", ttft_ms),
        tpot_ms=_latency("tpot_ms", tpot_ms),
    )
    models = [*bundle.manifest.models, spec]
    details = {
        "scored_prompts": len(scored.texts),
        # Rows that earlier add-model anchors put into the reference are not training data.
        "in_training_data": int((~np.isnan(observed_q[:, trained])).any(axis=1).sum()),
        "output_tokens_known": int((~np.isnan(scored.output_tokens)).sum()),
        **added.summary(list(engine.models)),
        "holdback_check": gate,
    }
    manifest = _write(
        bundle,
        engine,
        out_dir,
        graph,
        models,
        reference.with_outcomes(
            model, [prompt_key(t) for t in scored.texts], scored.score, scored.output_tokens
        ),
        "add-model",
        [model],
        details,
    )
    log.info("added %s in %.1f s: %s", model, time.perf_counter() - started, details)
    return manifest


def _holdback(
    added: AddedModel,
    regressors: np.ndarray,
    scored: Scored,
    estimates: Estimates,
    observed_q: np.ndarray,
    observed_o: np.ndarray,
    trained: np.ndarray,
    prices: tuple[str, float, float],
    engine: Engine,
) -> tuple[float, dict]:
    """How far to hold the new model's quality estimate back, checked by routing the anchors.

    A model estimated from a few hundred outcomes is less sure than the bundle's own models, and a
    small overestimate can draw traffic from better-known ones and make routing worse than without
    it. On the anchors where the bundle's reference has the outcomes of every checked model, the
    engine's estimates for those models and out-of-fold estimates for the new one are routed over
    the whole trade-off curve (AIQ, METRICS.md) against their true outcomes; the smallest
    HOLDBACK_STEPS value with which the curve is at least as good as without the model is kept (the
    largest step means: only where it is the one allowed). Models without outcomes on enough of
    the anchors (models added earlier have them on their own anchors only) are left out of the
    check, one at a time, until at least MIN_SCORED_PROMPTS anchors have every remaining model's;
    if no trained model is left, nothing is held back."""
    known = ~np.isnan(observed_q) & ~np.isnan(observed_o)
    columns = _checked_columns(known, trained)
    checkable = known[:, columns].all(axis=1) if columns else np.zeros(len(known), dtype=bool)
    info: dict = {
        "anchors_checked": int(checkable.sum()),
        "models_left_out": [m for i, m in enumerate(engine.models) if i not in columns],
    }
    if not columns:
        return 0.0, info | {"holdback": 0.0, "why": "too few anchors with trained models' outcomes"}
    _, p_in, p_out = prices
    all_in = np.append(engine.prices.input_usd_per_mtok, p_in)
    all_out = np.append(engine.prices.output_usd_per_mtok, p_out)
    _, new_tokens = added.predict(estimates.quality, estimates.output_tokens)
    true_tokens = np.where(np.isnan(scored.output_tokens), new_tokens, scored.output_tokens)
    rows = np.nonzero(checkable)[0]
    kept = [*columns, len(engine.models)]
    grid = np.ix_(rows, np.array(columns))
    in_tokens = estimates.input_tokens[rows][:, None]
    true_score = np.column_stack([observed_q[grid], scored.score[rows]])
    out_tokens = np.column_stack([observed_o[grid], true_tokens[rows]])
    true_cost = PER_TOKEN * (in_tokens * all_in[None, kept] + out_tokens * all_out[None, kept])
    cost = np.column_stack(
        [estimates.cost_usd[grid], PER_TOKEN * (in_tokens[:, 0] * p_in + new_tokens[rows] * p_out)]
    )
    oof = out_of_fold(regressors, scored.score, estimates.quality)[rows]
    names = [*(engine.models[c] for c in columns), "new"]

    def aiq(new_quality: np.ndarray) -> float:
        q = np.column_stack([estimates.quality[grid], new_quality])
        return float(evaluate(names, true_score, true_cost, q, cost, engine.policy.c_ref_usd).figures["aiq"])

    without = aiq(np.full(len(rows), -1e9))
    tried = {}
    for step in HOLDBACK_STEPS:
        tried[step] = aiq(oof - step)
        if tried[step] >= without:
            break
    info |= {"aiq_without": round(without, 4), "aiq_with": {str(k): round(v, 4) for k, v in tried.items()}}
    return step, info | {"holdback": step}


def _checked_columns(known: np.ndarray, trained: np.ndarray) -> list[int]:
    """The models the holdback check can route: all of them, less one at a time the model whose
    leaving out completes the most anchors (ties: a model added earlier, then the one with fewer
    known outcomes), until MIN_SCORED_PROMPTS anchors have every kept model's outcomes. None if
    that leaves no trained model: the check would then rest on outcomes the bundle never learnt."""
    columns = list(range(known.shape[1]))

    def complete(kept: list[int]) -> int:
        return int(known[:, kept].all(axis=1).sum())

    def gain(c: int) -> tuple[int, bool, int, int]:
        return complete([k for k in columns if k != c]), not trained[c], -int(known[:, c].sum()), c

    while columns and complete(columns) < MIN_SCORED_PROMPTS:
        columns.remove(max(columns, key=gain))
    return columns if trained[columns].any() else []


def remove_model(bundle_dir: Path, out_dir: Path, model: str) -> Manifest:
    bundle, engine = _open(bundle_dir)
    if model not in engine.models:
        raise FleetError(f"model {model!r} is not in bundle {bundle.version} (see ListModels)")
    if len(engine.models) == 1:
        raise FleetError(f"{model!r} is the bundle's only model; a bundle needs at least one")
    keep = [j for j, m in enumerate(engine.models) if m != model]
    old_graph = onnx.load(bundle.root / bundle.manifest.heads.file)
    graph = chain(old_graph, select_columns(len(engine.models), keep), _tag(bundle)).SerializeToString()
    reference = Reference.of_bundle(bundle)
    old_q, old_o = bundle.heads.run(reference.calibration.features)
    new_q, new_o = Heads(graph).run(reference.calibration.features)
    _check_unchanged(old_q[:, keep], old_o[:, keep], new_q, new_o)
    models = [m for m in bundle.manifest.models if m.name != model]
    kept = reference.select([m.name for m in models])
    return _write(bundle, engine, out_dir, graph, models, kept, "remove-model", [model], {})


def reprice(bundle_dir: Path, out_dir: Path, prices_path: Path) -> Manifest:
    """A new version with the prices and latencies of `prices_path` for the models it lists.

    Columns as models.csv: `model` and any of UPDATABLE; an empty cell keeps the bundle's value."""
    bundle, engine = _open(bundle_dir)
    table = _read(prices_path, ("model",), "CSV")
    given = [c for c in UPDATABLE if c in table.columns]
    if not given:
        raise FleetError(f"{prices_path}: nothing to update (give any of {', '.join(UPDATABLE)})")
    if table.empty:
        raise FleetError(f"{prices_path}: lists no model; nothing to update")
    if table["model"].duplicated().any():
        twice = table.loc[table["model"].duplicated(), "model"].iloc[0]
        raise FleetError(f"{prices_path}: model {twice!r} is listed twice")
    unknown = sorted(set(table["model"]) - set(engine.models), key=str)
    if unknown:
        raise FleetError(f"{prices_path}: model {unknown[0]!r} is not in bundle {bundle.version}")
    day = datetime.now(timezone.utc).date().isoformat()
    updates: dict[str, dict[str, float | str]] = {}
    for row in table.to_dict("records"):
        model = str(row["model"])
        update: dict[str, float | str] = {}
        for col in given:
            raw = row[col]
            if raw is None or (isinstance(raw, float) and math.isnan(raw)):
                continue
            value = pd.to_numeric(pd.Series([raw]), errors="coerce").iloc[0]
            if isinstance(raw, bool | np.bool_) or not 0 <= value <= _bound(col):  # NaN fails too
                raise FleetError(
                    f"{prices_path}: {col} of {model!r} must be a number from 0 to {_bound(col):,g}, "
                    f"got {raw!r}"
                )
            update[col] = float(value)
        if set(update) & set(PRICE_COLUMNS[1:]):
            update["price_source"] = f"repriced {day}"
        updates[model] = update
    if not any(updates.values()):
        raise FleetError(f"{prices_path}: every cell is empty; nothing to update")
    models = [
        m.model_copy(update=updates[m.name]) if m.name in updates else m for m in bundle.manifest.models
    ]
    graph = (bundle.root / bundle.manifest.heads.file).read_bytes()
    return _write(
        bundle,
        engine,
        out_dir,
        graph,
        models,
        Reference.of_bundle(bundle),
        "reprice",
        sorted(updates),
        updates,
    )


# -- shared steps --------------------------------------------------------------------------------


def recalibrated_policy(
    engine: Engine, before: Engine, calibration: PromptFeatures, old: PolicySpec
) -> PolicySpec:
    """Presets and c_ref for a changed bundle (`engine`; `before`: the bundle it changes), from
    both bundles' estimates on the calibration prompts, carried over from the old policy.

    The trainer calibrated on the table's observed costs, which a changed fleet does not have;
    recalibrating from scratch on predicted ones moved the presets several-fold for a change that
    changed nothing. So: c_ref scales with the mean over models of the mean predicted cost, and each
    cost preset takes the smallest w whose decisions' mean predicted cost is at most the share of
    the best model's predicted cost (the model with the best mean predicted quality) that its w had
    under the old bundle. Estimates that did not change keep the policy as it was."""
    new, prev = engine.estimate_features(calibration), before.estimate_features(calibration)
    if (
        new.models == prev.models
        and np.array_equal(new.quality, prev.quality)
        and np.array_equal(new.cost_usd, prev.cost_usd)
    ):
        return old
    before_usd, after_usd = float(np.mean(prev.cost_usd)), float(np.mean(new.cost_usd))
    c_ref = old.c_ref_usd * after_usd / before_usd if before_usd > 0 else old.c_ref_usd
    if not math.isfinite(c_ref) or c_ref <= 0:
        c_ref = old.c_ref_usd
    rows = np.arange(len(calibration))

    def mean_cost(est: Estimates, w: float, ref: float) -> float:
        return float(est.cost_usd[rows, choose(est.quality, est.cost_usd, w, ref)].mean())

    def best_cost(est: Estimates) -> float:
        return float(est.cost_usd[:, int(np.argmax(est.quality.mean(axis=0)))].mean())

    basis = f"carried over a fleet change on the estimates for {len(calibration)} validation prompts"
    curve = [(float(w), mean_cost(new, float(w), c_ref)) for w in W_GRID]
    best_before, best_after = best_cost(prev), best_cost(new)
    presets = {name: p for name, p in old.presets.items() if name not in PRESET_COST_FRACTIONS}
    for name, fraction in PRESET_COST_FRACTIONS.items():
        kept = old.presets.get(name)
        # A free best model leaves no share to keep, and a preset at w = 1 says only that the old
        # bundle could not get as cheap as it asks (all models about equally dear): carried over,
        # its share of about 1 would make it the quality preset for every later change.
        if kept is not None and best_before > 0 and kept.cost_weight < 1.0:
            fraction = mean_cost(prev, kept.cost_weight, old.c_ref_usd) / best_before
        target = fraction * best_after
        w = next((w for w, cost in curve if cost <= target), 1.0)
        presets[name] = PresetSpec(
            cost_weight=round(w, 8),
            description=f"mean cost about {int(PRESET_COST_FRACTIONS[name] * 100)}% of the most accurate "
            f"single model's ({basis})",
        )
    return PolicySpec(
        c_ref_usd=c_ref,
        default_cost_weight=presets[DEFAULT_PRESET].cost_weight,
        default_preset=DEFAULT_PRESET,
        presets=presets,
        spend_curve=spend_curve(new.quality, new.cost_usd, c_ref),
    )


def _write(
    bundle: Bundle,
    before: Engine,
    out_dir: Path,
    graph: bytes,
    models: list[ModelSpec],
    reference: Reference,
    op: str,
    changed: list[str],
    details: dict,
) -> Manifest:
    prices = Prices.from_rows([(m.name, m.input_usd_per_mtok, m.output_usd_per_mtok) for m in models])
    engine = Engine(
        bundle.embedder, Heads(graph), prices, bundle.token_estimator, bundle.manifest.policy, "candidate"
    )
    policy = recalibrated_policy(engine, before, reference.calibration, bundle.manifest.policy)
    change = ChangeSpec(
        op=op,
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        from_version=bundle.version,
        models=changed,
        details=details | {"c_ref_usd": policy.c_ref_usd, "calibration_prompts": len(reference.calibration)},
    )
    return rewrite_bundle(
        bundle, out_dir, heads_graph=graph, models=models, policy=policy, reference=reference, change=change
    )


def _open(bundle_dir: Path) -> tuple[Bundle, Engine]:
    return open_engine(bundle_dir, provider="cpu")


def _tag(bundle: Bundle) -> str:
    """A prefix no earlier change of this bundle's graph used."""
    return f"v{len(bundle.manifest.changes)}"


def _check_unchanged(old_q: np.ndarray, old_o: np.ndarray, new_q: np.ndarray, new_o: np.ndarray) -> None:
    if not (np.array_equal(old_q, new_q) and np.array_equal(old_o, new_o)):
        raise RuntimeError(
            "the edited heads graph changes the estimates of models it should keep as they are"
        )


def _prices(
    model: str, input_usd: float | None, output_usd: float | None, where: Path | None = None
) -> tuple[str, float, float]:
    prefix = f"{where}: " if where else ""
    for name, value in (("input_usd_per_mtok", input_usd), ("output_usd_per_mtok", output_usd)):
        if value is None:
            raise FleetError(f"{prefix}{name} of {model!r} is missing")
        if not isinstance(value, int | float) or not 0 <= value <= MAX_USD_PER_MTOK:  # NaN fails too
            raise FleetError(
                f"{prefix}{name} of {model!r} must be a number from 0 to {MAX_USD_PER_MTOK:,g}, got {value}"
            )
    return model, float(input_usd), float(output_usd)  # type: ignore[arg-type]


def _bound(column: str) -> float:
    return MAX_USD_PER_MTOK if column.endswith("_usd_per_mtok") else MAX_LATENCY_MS


def _check_name(model: str) -> None:
    """Model names become API values and metric labels: printable, unpadded, of sane length."""
    if not model or len(model) > 200 or model != model.strip() or not model.isprintable():
        raise FleetError(
            "--model must be 1-200 printable characters without leading or trailing spaces, "
            f"got {model[:80]!r}"
        )


def _latency(name: str, value: float | None) -> float | None:
    if value is not None and not 0 <= value <= MAX_LATENCY_MS:  # NaN fails too
        raise FleetError(
            f"{name} must be a number of milliseconds from 0 to {MAX_LATENCY_MS:,g}, got {value}"
        )
    return value


def _read(path: Path, columns: tuple[str, ...], kind: str) -> pd.DataFrame:
    """A parquet or CSV file with at least `columns`, or a FleetError naming the problem."""
    try:
        # only an empty cell is missing: "NaN", "NULL" or "N/A" in a price file is a mistake to name,
        # not "keep the old price"
        frame = (
            pd.read_parquet(path)
            if kind == "parquet"
            else pd.read_csv(path, keep_default_na=False, na_values=[""])
        )
    except Exception as exc:  # pyarrow and pandas raise several types for missing or malformed files
        raise FleetError(f"{path}: cannot read it as {kind} ({exc})") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise FleetError(f"{path}: missing column(s) {', '.join(missing)}")
    for key in ("prompt_id", "model"):
        if key in columns and frame[key].isna().any():
            raise FleetError(f"{path}: {key} is empty in row {int(np.argmax(frame[key].isna()))}")
    return frame


def _read_parquet(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    return _read(path, columns, "parquet")
