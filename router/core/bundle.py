"""Loading a bundle: the directory the trainer writes, described by its manifest.

Loading verifies all of it before anything runs: the manifest's own seal and format, that every
file is listed with its sha256 and the hash matches, that no path escapes the directory, that only
ONNX and JSON files are read (never pickle), and that the embedder, the feature spec and the heads
agree on shapes and models. A bundle failing any check is refused with a message naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from router.core.embedder import ENCODING, Embedder, file_sha256
from router.core.errors import BundleError
from router.core.features import FEATURE_VERSION, feature_names
from router.core.heads import Heads
from router.core.latency import Latencies
from router.core.manifest import Manifest
from router.core.pricing import Prices, TokenEstimator

LOADABLE_SUFFIXES = (".onnx", ".json")


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


def verify_files(root: Path, manifest: Manifest) -> dict[str, Path]:
    """Checks every listed file's checksum; returns the verified paths by manifest name."""
    needed = {manifest.embedder.onnx, manifest.embedder.tokenizer, manifest.heads.file}
    if manifest.reference is not None:  # read by the fleet commands: checked like the rest
        needed |= {manifest.reference.outcomes, manifest.reference.calibration}
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


@dataclass(frozen=True)
class Bundle:
    """A verified bundle with its sessions open."""

    root: Path
    manifest: Manifest
    embedder: Embedder
    heads: Heads

    @property
    def version(self) -> str:
        return self.manifest.bundle_version

    @property
    def prices(self) -> Prices:
        return Prices.from_rows(
            [(m.name, m.input_usd_per_mtok, m.output_usd_per_mtok) for m in self.manifest.models]
        )

    @property
    def latencies(self) -> Latencies:
        return Latencies.from_specs([(m.ttft_ms, m.tpot_ms) for m in self.manifest.models])

    @property
    def token_estimator(self) -> TokenEstimator:
        spec = self.manifest.token_estimator
        return TokenEstimator(spec.intercept, spec.per_word_piece, spec.per_char)


def load_bundle(path: Path | str, *, provider: str = "auto", threads: int = 0) -> Bundle:
    root = Path(path)
    manifest = Manifest.read(root)
    files = verify_files(root, manifest)
    spec = manifest.embedder
    if spec.encoding != ENCODING:
        raise BundleError(f"embedder encoding {spec.encoding!r} is not this version's ({ENCODING!r})")
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
    return Bundle(root, manifest, embedder, heads)
