"""The heads model: per-model quality and output length from prompt features, with its ONNX export.

quality = the quality blend (training/quality_model.py); output tokens = the mean of the per-model
LightGBM boosters and the nearest training prompts' output lengths. The terms below are the one
definition of that mix: `predict` evaluates them in Python, `to_onnx` builds the graph from them,
and `export` proves the two agree before a graph goes anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from router.core.heads import Heads
from training.boosters import BoosterParams, Boosters, fit_per_model
from training.onnx_graph import Term, assemble
from training.quality_model import BlendParams, QualityBlend

QUALITY_TERMS: tuple[Term, ...] = (("blend", "quality", 1.0),)
OUTPUT_TOKENS_TERMS: tuple[Term, ...] = (
    ("boosters", "columns", 0.5),
    ("blend", "neighbour_output_tokens", 0.5),
)
KIND = (
    "quality: blend of an MLP ensemble and a k-nearest-neighbour mean, with a near-duplicate kernel; "
    "output tokens: mean of per-model LightGBM (Poisson) and the nearest training prompts' output lengths"
)

# The trained heads (torch, LightGBM) and their ONNX graph agree to float32 rounding; anything
# beyond this is a broken export.
PARITY_TOLERANCE = 1e-4
# Except where the neighbour memory meets a near-tie: torch and ONNX Runtime round similarities
# differently, so two almost equally similar training prompts may swap places at the k-th
# neighbour, which moves that prompt's neighbour means by up to 1/k of the pair's difference
# (quality: 0.008 at k = 128). Such prompts are rare; a broken export is wrong on nearly all.
TIE_ROW_SHARE = 0.05
NEIGHBOUR_SWAP_TOLERANCE = {"quality": 0.02, "output tokens": 0.5}


@dataclass(frozen=True)
class HeadsParams:
    blend: BlendParams = field(default_factory=BlendParams)
    boosters: BoosterParams = field(default_factory=BoosterParams)

    def as_dict(self) -> dict:
        return {
            "quality": asdict(self.blend),
            "output_tokens": asdict(self.boosters),
            "quality_terms": [list(t) for t in QUALITY_TERMS],
            "output_tokens_terms": [list(t) for t in OUTPUT_TOKENS_TERMS],
        }


class HeadsModel:
    def __init__(self, blend: QualityBlend, boosters: Boosters, n_features: int) -> None:
        self.blend = blend
        self.boosters = boosters
        self.n_features = n_features

    @property
    def models(self) -> list[str]:
        return self.boosters.models

    @classmethod
    def fit(
        cls,
        models: list[str],
        features: np.ndarray,
        score: np.ndarray,
        output_tokens: np.ndarray,
        dim: int,
        params: HeadsParams,
        *,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        rounds: list[int] | None = None,
    ) -> HeadsModel:
        """features: prompts x F (the first `dim` the unit embedding); score and output_tokens:
        prompts x models, NaN where unobserved. The boosters' rounds come from early stopping on
        `validation` (features, output tokens), or are given."""
        blend = QualityBlend.fit(features, score, output_tokens, dim, params.blend)
        x_val, y_val = validation if validation is not None else (features[:0], output_tokens[:0])
        boosters = fit_per_model(
            "poisson", models, features, output_tokens, x_val, y_val, params.boosters, rounds=rounds
        )
        return cls(blend, boosters, features.shape[1])

    def _outputs(self, features: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        quality, near_tokens = self.blend.predict(features)
        return {
            ("blend", "quality"): quality,
            ("blend", "neighbour_output_tokens"): near_tokens,
            ("boosters", "columns"): self.boosters.predict(features),
        }

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quality, output tokens), each prompts x models, as the exported graph computes them."""
        outputs = self._outputs(features)

        def weighted(terms: tuple[Term, ...]) -> np.ndarray:
            return sum(weight * outputs[(part, name)] for part, name, weight in terms)  # type: ignore[return-value]

        return np.clip(weighted(QUALITY_TERMS), 0.0, 1.0), np.maximum(weighted(OUTPUT_TOKENS_TERMS), 0.0)

    def to_onnx(self) -> onnx.ModelProto:
        parts = {"blend": self.blend.to_onnx(), "boosters": self.boosters.to_onnx(self.n_features)}
        return assemble(self.n_features, len(self.models), parts, QUALITY_TERMS, OUTPUT_TOKENS_TERMS)

    def export(self, check_features: np.ndarray) -> bytes:
        """The serialised graph, after checking it against `predict` on `check_features`."""
        graph = self.to_onnx().SerializeToString()
        problems = parity_problems(self.predict(check_features), Heads(graph).run(check_features))
        if problems:
            raise RuntimeError("ONNX heads disagree with the trained heads: " + "; ".join(problems))
        return graph


def parity_problems(
    reference: tuple[np.ndarray, np.ndarray], exported: tuple[np.ndarray, np.ndarray]
) -> list[str]:
    """How the exported heads' (quality, output tokens) disagree with the trained ones, if they do."""
    (q_ref, o_ref), (q_onnx, o_onnx) = reference, exported
    gaps = {
        "quality": np.abs(q_onnx - q_ref),
        "output tokens": np.abs(o_onnx - o_ref) / np.maximum(o_ref, 1.0),
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
