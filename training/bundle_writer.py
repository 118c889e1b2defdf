"""Writes a bundle directory (ONNX and JSON files + manifest.json) and proves it loads before handing
it over: a freshly trained bundle, or a new version of one (training/fleet.py).

The bundle is assembled in a staging directory next to the target, opened the way the service
opens it (verification, self-check), and only then renamed into place, so a watcher never sees
half a bundle and a bundle that would be refused is never published.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from router.core.bundle import Bundle
from router.core.embedder import ENCODING, Embedder, file_sha256
from router.core.engine import open_engine
from router.core.features import FEATURE_VERSION, feature_names
from router.core.manifest import (
    FORMAT_VERSION,
    ChangeSpec,
    EmbedderSpec,
    FeatureSpec,
    HeadsSpec,
    Manifest,
    ModelSpec,
    PolicySpec,
    ReferenceSpec,
    TokenEstimatorSpec,
    TrainingSpec,
)
from training.embedder_export import ExportedEmbedder
from training.outputs import BUNDLE_MARKER, replaced_dir
from training.reference import CALIBRATION_FILE, OUTCOMES_FILE, Reference

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
    reference: Reference


def write_bundle(out_dir: Path, c: BundleContents) -> Manifest:
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
        files={},
        reference=ReferenceSpec(outcomes=OUTCOMES_FILE, calibration=CALIBRATION_FILE),
    )
    files: dict[str, Path | bytes] = {
        EMBEDDER_ONNX: c.exported.onnx_path,
        EMBEDDER_TOKENIZER: c.exported.tokenizer_path,
        HEADS_FILE: c.heads_graph,
        **c.reference.files(),
    }
    return publish(out_dir, manifest, files)


def rewrite_bundle(
    source: Bundle,
    out_dir: Path,
    *,
    heads_graph: bytes,
    models: list[ModelSpec],
    policy: PolicySpec,
    reference: Reference,
    change: ChangeSpec,
) -> Manifest:
    """A new version of `source` with other heads, models, policy and reference data; the embedder
    and everything else carried over. The change is appended to the manifest's history."""
    m = source.manifest
    created = datetime.now(timezone.utc)
    digest = hashlib.sha256(heads_graph + json.dumps([x.model_dump() for x in models]).encode()).hexdigest()
    manifest = m.model_copy(
        update={
            "bundle_version": f"{m.training.table}-{created:%Y%m%dT%H%M%SZ}-{digest[:8]}",
            "created_at": created.isoformat(timespec="seconds"),
            "models": models,
            "policy": policy,
            "heads": m.heads.model_copy(update={"file": HEADS_FILE}),
            "reference": ReferenceSpec(outcomes=OUTCOMES_FILE, calibration=CALIBRATION_FILE),
            "changes": [*m.changes, change],
            "files": {},
        }
    )
    files: dict[str, Path | bytes] = {
        EMBEDDER_ONNX: source.root / m.embedder.onnx,
        EMBEDDER_TOKENIZER: source.root / m.embedder.tokenizer,
        HEADS_FILE: heads_graph,
        **reference.files(),
    }
    return publish(out_dir, manifest, files, inputs=[source.root])


def publish(
    out_dir: Path, manifest: Manifest, files: Mapping[str, Path | bytes], inputs: Sequence[Path] = ()
) -> Manifest:
    """Writes `files` and the manifest (with their checksums) into a staging directory, opens it as
    the service would, and only then moves it to `out_dir`."""
    with replaced_dir(out_dir, BUNDLE_MARKER, inputs) as staging:
        for relative, content in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        sealed = Manifest.model_validate(
            manifest.model_dump() | {"files": {rel: file_sha256(staging / rel) for rel in files}}
        )
        sealed.write(staging)
        bundle, _ = open_engine(staging, provider="cpu")  # refuses exactly what the service would
    return bundle.manifest
