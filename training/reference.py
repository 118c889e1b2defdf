"""What a bundle keeps of its training data for the fleet commands (add-model, remove-model, reprice).

Two JSON files, listed and checksummed in the manifest like every other file, read only by the
training side (the service verifies their checksums and never opens them):

- outcomes: per training prompt, each model's observed score and billed output tokens, keyed by
  the sha256 of the prompt text (the text itself is not kept). A new model's outcomes on anchor
  prompts are related to the other models' outcomes on the same prompts through it.
- calibration: the head features of a sample of validation prompts (float32, base64), on which the
  presets and c_ref are recalibrated after a change, through the engine like any prediction.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from router.core.bundle import Bundle
from router.core.errors import BundleError
from router.core.features import PromptFeatures

OUTCOMES_FILE = "reference/outcomes.json"
CALIBRATION_FILE = "reference/calibration.json"
# Enough prompts for a mean cost per preset to be steady; few enough to keep the bundle small.
CALIBRATION_PROMPTS = 1000


def prompt_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _column_lists(values: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in values]


def _array(rows: list[list[float | None]], width: int) -> np.ndarray:
    out = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
    return out.reshape(len(rows), width)


@dataclass(frozen=True)
class Reference:
    models: list[str]
    prompt_keys: list[str]
    score: np.ndarray  # prompts x models, NaN where unobserved
    output_tokens: np.ndarray  # prompts x models, billed output tokens, NaN where unknown
    calibration: PromptFeatures  # of the calibration prompts

    def outcomes_json(self) -> bytes:
        body = {
            "models": self.models,
            "prompt_sha256": self.prompt_keys,
            "score": _column_lists(self.score),
            "output_tokens": _column_lists(self.output_tokens),
        }
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    def calibration_json(self) -> bytes:
        features = np.ascontiguousarray(self.calibration.features, dtype="<f4")
        body = {
            "rows": int(features.shape[0]),
            "columns": int(features.shape[1]),
            "dtype": "float32 little-endian",
            "features_base64": base64.b64encode(features.tobytes()).decode("ascii"),
            "word_pieces": self.calibration.word_pieces.astype(int).tolist(),
            "chars": self.calibration.chars.astype(int).tolist(),
        }
        return json.dumps(body).encode("utf-8")

    def files(self) -> dict[str, bytes]:
        return {OUTCOMES_FILE: self.outcomes_json(), CALIBRATION_FILE: self.calibration_json()}

    @classmethod
    def of_bundle(cls, bundle: Bundle) -> Reference:
        spec = bundle.manifest.reference
        if spec is None:
            raise BundleError(
                f"bundle {bundle.version} has no reference data (it was trained before the fleet "
                "commands existed); retrain it with `router train`"
            )
        return cls.read(bundle.root / spec.outcomes, bundle.root / spec.calibration)

    @classmethod
    def read(cls, outcomes: Path, calibration: Path) -> Reference:
        try:
            o = json.loads(outcomes.read_text(encoding="utf-8"))
            c = json.loads(calibration.read_text(encoding="utf-8"))
            width = len(o["models"])
            raw = base64.b64decode(c["features_base64"])
            features = np.frombuffer(raw, dtype="<f4").reshape(c["rows"], c["columns"])
            return cls(
                list(o["models"]),
                list(o["prompt_sha256"]),
                _array(o["score"], width),
                _array(o["output_tokens"], width),
                PromptFeatures(
                    features.astype(np.float32),
                    np.asarray(c["word_pieces"], dtype=np.float64),
                    np.asarray(c["chars"], dtype=np.float64),
                ),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"reference files of the bundle are unreadable ({exc})") from exc

    def rows_of(self, texts: Sequence[str]) -> np.ndarray:
        """Index of each text among the training prompts, -1 where it is not one of them."""
        where = {key: i for i, key in enumerate(self.prompt_keys)}
        return np.array([where.get(prompt_key(t), -1) for t in texts], dtype=int)

    def select(self, models: Sequence[str]) -> Reference:
        """The same prompts with the columns of `models` (NaN for a model it has no outcomes of)."""
        index = {m: j for j, m in enumerate(self.models)}
        score = np.full((len(self.prompt_keys), len(models)), np.nan)
        tokens = np.full_like(score, np.nan)
        for k, m in enumerate(models):
            if m in index:
                score[:, k] = self.score[:, index[m]]
                tokens[:, k] = self.output_tokens[:, index[m]]
        return Reference(list(models), self.prompt_keys, score, tokens, self.calibration)

    def with_outcomes(
        self, model: str, keys: Sequence[str], score: np.ndarray, tokens: np.ndarray
    ) -> Reference:
        """This reference with a column for `model` holding its outcomes on the prompts `keys`;
        prompts that are not training prompts are appended (the other models unobserved there)."""
        extended = self.select([*self.models, model])
        where = {key: i for i, key in enumerate(extended.prompt_keys)}
        new_keys = [k for k in dict.fromkeys(keys) if k not in where]
        pad = np.full((len(new_keys), len(extended.models)), np.nan)
        all_score = np.vstack([extended.score, pad])
        all_tokens = np.vstack([extended.output_tokens, pad])
        where |= {k: len(extended.prompt_keys) + i for i, k in enumerate(new_keys)}
        rows = np.array([where[k] for k in keys], dtype=int)
        all_score[rows, -1] = score
        all_tokens[rows, -1] = tokens
        return Reference(
            extended.models, [*extended.prompt_keys, *new_keys], all_score, all_tokens, self.calibration
        )
