"""Writes a bundle directory (ONNX files + manifest.json) and proves it loads before handing it over.

The bundle is assembled in a staging directory next to the target, opened the way the service
opens it (verification, self-check), and only then renamed into place, so a watcher never sees
half a bundle and a bundle that would be refused is never published.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from router.core.embedder import ENCODING, Embedder, file_sha256
from router.core.engine import open_engine
from router.core.features import FEATURE_VERSION, feature_names
from router.core.manifest import (
    FORMAT_VERSION,
    EmbedderSpec,
    FeatureSpec,
    HeadsSpec,
    Manifest,
    ModelSpec,
    PolicySpec,
    TokenEstimatorSpec,
    TrainingSpec,
)
from training.embedder_export import ExportedEmbedder

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDER_ONNX = "embedder/embedder.onnx"
EMBEDDER_TOKENIZER = "embedder/tokenizer.json"
HEADS_FILE = "heads.onnx"


@dataclass(frozen=True)
class BundleContents:
    table_name: str
    embedder: Embedder
    exported: ExportedEmbedder
    heads_graph: bytes  # already checked against the trained heads
    heads_kind: str
    models: list[ModelSpec]
    token_estimator: TokenEstimatorSpec
    policy: PolicySpec
    training: TrainingSpec


def write_bundle(out_dir: Path, c: BundleContents) -> Manifest:
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "embedder").mkdir(parents=True)
    shutil.copyfile(c.exported.onnx_path, staging / EMBEDDER_ONNX)
    shutil.copyfile(c.exported.tokenizer_path, staging / EMBEDDER_TOKENIZER)
    (staging / HEADS_FILE).write_bytes(c.heads_graph)

    created = datetime.now(timezone.utc)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        bundle_version=f"{c.table_name}-{created:%Y%m%dT%H%M%SZ}-{c.training.data_fingerprint[:8]}",
        created_at=created.isoformat(timespec="seconds"),
        embedder=EmbedderSpec(
            onnx=EMBEDDER_ONNX,
            tokenizer=EMBEDDER_TOKENIZER,
            precision=c.exported.precision,
            max_tokens=c.embedder.max_tokens,
            dim=c.embedder.dim,
            base_model=BASE_MODEL,
            encoding=ENCODING,
            sha256=c.embedder.sha256,
        ),
        heads=HeadsSpec(file=HEADS_FILE, kind=c.heads_kind),
        features=FeatureSpec(version=FEATURE_VERSION, names=feature_names(c.embedder.dim)),
        models=c.models,
        token_estimator=c.token_estimator,
        policy=c.policy,
        training=c.training,
        files={rel: file_sha256(staging / rel) for rel in (EMBEDDER_ONNX, EMBEDDER_TOKENIZER, HEADS_FILE)},
    )
    manifest.write(staging)
    bundle, _ = open_engine(staging, provider="cpu")  # refuses exactly what the service would
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return bundle.manifest
