"""The bundle: a directory the trainer writes and the service loads, described by manifest.json.

Loading verifies all of it before anything runs: the format version, that every file is listed
with its sha256 and the hash matches, that no path escapes the directory, that only ONNX and JSON
files are read (never pickle), and that the embedder, the feature spec and the heads agree on
shapes and models. A bundle failing any check is refused with a message naming the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.embedder import Embedder, file_sha256
from router.features import FEATURE_VERSION, feature_names
from router.heads import Heads
from router.pricing import Prices, TokenEstimator

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOADABLE_SUFFIXES = (".onnx", ".json")


class BundleError(Exception):
    """A bundle that must not be served; the message says why."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbedderSpec(_Spec):
    onnx: str
    tokenizer: str
    precision: str
    max_tokens: int = Field(gt=2)
    dim: int = Field(gt=0)
    pooling: str = "mean"
    normalized: bool = True
    base_model: str
    fine_tuned: bool = False
    sha256: str


class HeadsSpec(_Spec):
    file: str
    kind: str
    input: str = "features"


class FeatureSpec(_Spec):
    version: str
    names: list[str]


class ModelSpec(_Spec):
    name: str = Field(min_length=1)
    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(ge=0)
    output_tokens_known: bool


class TokenEstimatorSpec(_Spec):
    intercept: float
    per_word_piece: float
    per_char: float
    mean_abs_error_tokens: float | None = None
    source: str


class PresetSpec(_Spec):
    cost_weight: float = Field(ge=0, le=1)
    description: str


class PolicySpec(_Spec):
    c_ref_usd: float = Field(gt=0)
    default_cost_weight: float = Field(ge=0, le=1)
    presets: dict[str, PresetSpec] = Field(default_factory=dict)


class Manifest(_Spec):
    format_version: int
    bundle_version: str = Field(min_length=1)
    created_at: str
    embedder: EmbedderSpec
    heads: HeadsSpec
    features: FeatureSpec
    models: list[ModelSpec] = Field(min_length=1)
    token_estimator: TokenEstimatorSpec
    policy: PolicySpec
    training: dict
    files: dict[str, str]

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        return models


def _safe_path(root: Path, relative: str) -> Path:
    """The file a manifest entry names, refusing anything that would leave the bundle."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in relative:
        raise BundleError(f"path {relative!r} escapes the bundle directory")
    path = root / pure
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError as exc:
        raise BundleError(f"path {relative!r} escapes the bundle directory (through a link)") from exc
    return path


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory")
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: not a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {raw.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path}: invalid manifest at {where}: {first['msg']}") from exc


def verify_files(root: Path, manifest: Manifest) -> dict[str, Path]:
    """Checks every listed file's checksum; returns the verified paths by manifest name."""
    needed = {manifest.embedder.onnx, manifest.embedder.tokenizer, manifest.heads.file}
    unlisted = needed - set(manifest.files)
    if unlisted:
        raise BundleError(f"file {sorted(unlisted)[0]!r} is used but has no sha256 in the manifest")
    verified = {}
    for relative, expected in manifest.files.items():
        path = _safe_path(root, relative)
        if path.suffix not in LOADABLE_SUFFIXES:
            raise BundleError(f"file {relative!r}: only ONNX and JSON files may be in a bundle")
        if not path.is_file():
            raise BundleError(f"file {relative!r} is listed in the manifest but missing")
        actual = file_sha256(path)
        if actual != expected:
            raise BundleError(
                f"file {relative!r}: sha256 mismatch (manifest {expected[:12]}…, file {actual[:12]}…)"
            )
        verified[relative] = path
    return verified


@dataclass
class Bundle:
    """A verified bundle with its sessions open, ready to estimate."""

    root: Path
    manifest: Manifest
    embedder: Embedder
    heads: Heads
    prices: Prices
    token_estimator: TokenEstimator

    @property
    def version(self) -> str:
        return self.manifest.bundle_version

    @property
    def models(self) -> tuple[str, ...]:
        return self.prices.models


def load_bundle(path: Path | str, *, provider: str = "auto", threads: int = 0) -> Bundle:
    root = Path(path)
    manifest = read_manifest(root)
    files = verify_files(root, manifest)
    spec = manifest.embedder
    try:
        embedder = Embedder(
            files[spec.onnx],
            files[spec.tokenizer],
            max_tokens=spec.max_tokens,
            provider=provider,
            threads=threads,
        )
        heads = Heads(files[manifest.heads.file])
    except (ValueError, OSError, RuntimeError) as exc:
        raise BundleError(str(exc)) from exc
    if embedder.sha256 != spec.sha256:
        raise BundleError("embedder identity does not match the manifest (files or max_tokens changed)")
    if embedder.dim != spec.dim:
        raise BundleError(f"embedder produces {embedder.dim}-d vectors, manifest says {spec.dim}")
    if manifest.features.version != FEATURE_VERSION:
        raise BundleError(
            f"feature spec version {manifest.features.version!r} is not this service's ({FEATURE_VERSION!r})"
        )
    if manifest.features.names != feature_names(spec.dim):
        raise BundleError("feature names in the manifest differ from the service's feature code")
    if heads.n_features != len(manifest.features.names):
        raise BundleError(
            f"heads read {heads.n_features} features, the feature spec has {len(manifest.features.names)}"
        )
    if heads.n_models != len(manifest.models):
        raise BundleError(f"heads predict {heads.n_models} models, the manifest lists {len(manifest.models)}")
    prices = Prices.from_rows(
        [(m.name, m.input_usd_per_mtok, m.output_usd_per_mtok) for m in manifest.models]
    )
    est = manifest.token_estimator
    return Bundle(
        root,
        manifest,
        embedder,
        heads,
        prices,
        TokenEstimator(est.intercept, est.per_word_piece, est.per_char),
    )
