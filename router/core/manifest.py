"""The bundle manifest: one typed model, written and read by the same class.

`manifest.json` describes a bundle completely (embedder identity, feature spec, heads, models and
prices, token map, policy, where the training data came from and what validation measured, and
the sha256 of every file). It carries a checksum of its own content, so that a hand edit or a
truncated copy is refused rather than served: `Manifest.write` seals it, `Manifest.read` checks
the seal before anything else is trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.core.errors import BundleError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CHECKSUM_FIELD = "manifest_sha256"


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
    encoding: str
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
    # Where the prices come from: the table's list prices, fitted from recorded costs, or a reprice.
    price_source: str = "list price"
    # How the heads know this model: trained on the routing table, or added from scored anchors.
    origin: str = "trained"
    # Time to first token and time per output token, ms (optional; needed for latency ceilings).
    ttft_ms: float | None = Field(default=None, ge=0)
    tpot_ms: float | None = Field(default=None, ge=0)


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
    default_preset: str | None = None
    presets: dict[str, PresetSpec] = Field(default_factory=dict)
    # (w, mean predicted cost per call in USD) on validation: where a spend target starts
    spend_curve: list[tuple[float, float]] = Field(default_factory=list)


class ValidationFigures(_Spec):
    """What the exported heads reached on validation carved from `train`, through the engine."""

    aiq: float
    aiq_zero: float
    aiq_oracle: float
    gap_closed: float
    quality_at_w0: float
    quality_ece: float
    cost_mae_usd: float


class TrainingSpec(_Spec):
    table: str
    data_dir: str
    data_fingerprint: str = Field(min_length=64, max_length=64)
    train_prompts: int = Field(ge=1)
    validation_prompts: int = Field(ge=0)
    outcome_rows: int = Field(ge=1)
    validation_fraction: float
    seed: int
    heads_params: dict[str, Any]
    output_head_rounds: dict[str, int]
    validation_metrics: ValidationFigures
    durations_s: dict[str, float]
    # outcomes from a feedback store that joined the fitted rows (router train --feedback)
    feedback_outcomes: int = Field(default=0, ge=0)


class ReferenceSpec(_Spec):
    """Files the fleet commands (add-model, remove-model, reprice) read; the service never does.

    `outcomes`: the training prompts' observed scores and billed output tokens per model, keyed
    by a hash of the prompt text (no prompt text), so that a new model's anchor outcomes can be
    related to the other models' outcomes on the same prompts. `calibration`: the features of
    validation prompts, on which presets and c_ref are recalibrated after a change."""

    outcomes: str
    calibration: str


class ChangeSpec(_Spec):
    """One change made to a bundle after training (add-model, remove-model, reprice)."""

    op: str
    at: str
    from_version: str
    models: list[str]
    details: dict[str, Any] = Field(default_factory=dict)


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
    training: TrainingSpec
    files: dict[str, str]
    reference: ReferenceSpec | None = None
    changes: list[ChangeSpec] = Field(default_factory=list)

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        return models

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def write(self, directory: Path) -> Path:
        """Writes manifest.json into `directory`, sealed with its checksum."""
        raw = self.model_dump(mode="json")
        raw[CHECKSUM_FIELD] = content_checksum(raw)
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Reads and checks manifest.json: readable, a supported format, sealed, and well-formed."""
        root = Path(directory)
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
                f"(expected {FORMAT_VERSION}; retrain the bundle with `router train`)"
            )
        sealed = raw.pop(CHECKSUM_FIELD, None)
        if sealed != content_checksum(raw):
            raise BundleError(
                f"{path}: {CHECKSUM_FIELD} does not match the manifest's content "
                "(edited or damaged after it was written)"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise BundleError(f"{path}: invalid manifest at {where}: {first['msg']}") from exc


def content_checksum(raw: dict[str, Any]) -> str:
    """sha256 of a manifest's content (without its own checksum field), in a canonical JSON form."""
    body = {k: v for k, v in raw.items() if k != CHECKSUM_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
