"""Writes a bundle directory (ONNX files + manifest.json) and proves it loads before handing it over.

The bundle is assembled in a staging directory next to the target and renamed into place, so a
watcher never sees half a bundle.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from router.bundle import FORMAT_VERSION, MANIFEST, Manifest, load_bundle
from router.embedder import Embedder, file_sha256
from router.features import FEATURE_VERSION, feature_names
from router.pricing import TokenEstimator
from training.embedder_export import ExportedEmbedder
from training.heads import TrainedHeads
from training.onnx_heads import heads_to_onnx
from training.tables import RoutingTable

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# LightGBM and its ONNX graph agree to float32 rounding; anything beyond this is a broken export.
PARITY_TOLERANCE = 1e-4


@dataclass
class BundleContents:
    table: RoutingTable
    embedder: Embedder
    exported: ExportedEmbedder
    heads: TrainedHeads
    n_features: int
    token_estimator: TokenEstimator
    token_estimator_mae: float | None
    token_estimator_source: str
    output_tokens_known: dict[str, bool]
    c_ref: float
    presets: dict[str, dict]
    default_preset: str
    training: dict
    check_features: np.ndarray
    fine_tuned: bool = False


def write_bundle(out_dir: Path, c: BundleContents, durations: dict[str, float]) -> Manifest:
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "embedder").mkdir(parents=True)
    shutil.copyfile(c.exported.onnx_path, staging / "embedder" / "embedder.onnx")
    shutil.copyfile(c.exported.tokenizer_path, staging / "embedder" / "tokenizer.json")
    graph = heads_to_onnx(c.heads, c.n_features)
    onnx.save(graph, str(staging / "heads.onnx"))

    created = datetime.now(timezone.utc)
    fingerprint = c.training["data_fingerprint"]
    files = {
        rel: file_sha256(staging / rel)
        for rel in ("embedder/embedder.onnx", "embedder/tokenizer.json", "heads.onnx")
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "bundle_version": f"{c.table.name}-{created:%Y%m%dT%H%M%SZ}-{fingerprint[:8]}",
        "created_at": created.isoformat(timespec="seconds"),
        "embedder": {
            "onnx": "embedder/embedder.onnx",
            "tokenizer": "embedder/tokenizer.json",
            "precision": c.exported.precision,
            "max_tokens": c.embedder.max_tokens,
            "dim": c.embedder.dim,
            "pooling": "mean",
            "normalized": True,
            "base_model": BASE_MODEL,
            "fine_tuned": c.fine_tuned,
            "sha256": c.embedder.sha256,
        },
        "heads": {"file": "heads.onnx", "kind": "lightgbm-per-model", "input": "features"},
        "features": {"version": FEATURE_VERSION, "names": feature_names(c.embedder.dim)},
        "models": [
            {
                "name": row.model,
                "input_usd_per_mtok": float(row.input_usd_per_mtok),
                "output_usd_per_mtok": float(row.output_usd_per_mtok),
                "output_tokens_known": c.output_tokens_known[row.model],
            }
            for row in c.table.prices.itertuples(index=False)
        ],
        "token_estimator": {
            "intercept": c.token_estimator.intercept,
            "per_word_piece": c.token_estimator.per_word_piece,
            "per_char": c.token_estimator.per_char,
            "mean_abs_error_tokens": c.token_estimator_mae,
            "source": c.token_estimator_source,
        },
        "policy": {
            "c_ref_usd": c.c_ref,
            "default_cost_weight": c.presets[c.default_preset]["cost_weight"],
            "presets": c.presets,
        },
        "training": c.training | {"durations_s": durations, "default_preset": c.default_preset},
        "files": files,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")

    bundle = load_bundle(staging, provider="cpu")
    q_onnx, o_onnx = bundle.heads.run(c.check_features.astype(np.float32))
    q_lgb, o_lgb = c.heads.predict(c.check_features)
    worst = max(
        float(np.abs(q_onnx - q_lgb).max()), float((np.abs(o_onnx - o_lgb) / np.maximum(o_lgb, 1)).max())
    )
    if worst > PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX heads differ from LightGBM by {worst:.2g} (> {PARITY_TOLERANCE})")

    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return bundle.manifest
