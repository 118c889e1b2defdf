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
from training.tables import RoutingTable

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The trained heads (torch, LightGBM) and their ONNX graph agree to float32 rounding; anything
# beyond this is a broken export.
PARITY_TOLERANCE = 1e-4
# Except where the neighbour memory meets a near-tie: torch and ONNX Runtime round similarities
# differently, so two almost equally similar training prompts may swap places at the k-th
# neighbour, which moves that prompt's neighbour means by up to 1/k of the pair's difference
# (quality: 0.008 at k = 128). Such prompts are rare; a broken export is wrong on nearly all.
TIE_ROW_SHARE = 0.05
NEIGHBOUR_SWAP_TOLERANCE = {"quality": 0.02, "output tokens": 0.5}


def parity_problems(
    reference: tuple[np.ndarray, np.ndarray], exported: tuple[np.ndarray, np.ndarray]
) -> list[str]:
    """How the exported heads' (quality, output tokens) disagree with the trained ones, if they do."""
    (q_ref, o_ref), (q_onnx, o_onnx) = reference, exported
    gaps = {
        "quality": np.abs(q_onnx - np.clip(q_ref, 0.0, 1.0)),
        "output tokens": np.abs(o_onnx - np.maximum(o_ref, 0.0)) / np.maximum(o_ref, 1.0),
    }
    off = np.zeros(len(q_ref), dtype=bool)
    for gap in gaps.values():
        off |= (gap > PARITY_TOLERANCE).any(axis=1)
    problems = []
    if off.mean() > TIE_ROW_SHARE:
        problems.append(f"{off.sum()} of {len(off)} check prompts differ")
    for name, gap in gaps.items():
        if gap.max() > NEIGHBOUR_SWAP_TOLERANCE[name]:
            problems.append(f"{name} differs by up to {gap.max():.2g}")
    return problems


@dataclass
class BundleContents:
    table: RoutingTable
    embedder: Embedder
    exported: ExportedEmbedder
    heads_graph: onnx.ModelProto
    heads_kind: str
    # (features, quality, output tokens) as the trained heads predict them, for the parity check
    reference: tuple[np.ndarray, np.ndarray, np.ndarray]
    token_estimator: TokenEstimator
    token_estimator_mae: float | None
    token_estimator_source: str
    output_tokens_known: dict[str, bool]
    c_ref: float
    presets: dict[str, dict]
    default_preset: str
    training: dict


def write_bundle(out_dir: Path, c: BundleContents, durations: dict[str, float]) -> Manifest:
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "embedder").mkdir(parents=True)
    shutil.copyfile(c.exported.onnx_path, staging / "embedder" / "embedder.onnx")
    shutil.copyfile(c.exported.tokenizer_path, staging / "embedder" / "tokenizer.json")
    onnx.save(c.heads_graph, str(staging / "heads.onnx"))

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
            "fine_tuned": False,
            "sha256": c.embedder.sha256,
        },
        "heads": {"file": "heads.onnx", "kind": c.heads_kind, "input": "features"},
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
    features, q_ref, o_ref = c.reference
    problems = parity_problems((q_ref, o_ref), bundle.heads.run(features.astype(np.float32)))
    if problems:
        raise RuntimeError("ONNX heads disagree with the trained heads: " + "; ".join(problems))

    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return bundle.manifest
