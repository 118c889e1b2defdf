"""The one feature code path: prompt text -> the vector the heads read.

Training and serving both call `build_features`, so a head never sees features computed another
way than it was trained on. The feature names are recorded in the bundle manifest and checked
against this module when a bundle is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from router.embedder import TokenizedPrompt

FEATURE_VERSION = "1"
# Cheap, length- and shape-aware signals that a sentence embedding normalises away.
EXTRA_FEATURES = ("log_tokens", "log_chars", "log_lines", "digit_frac", "non_ascii_frac", "truncated")


def feature_names(embedding_dim: int) -> list[str]:
    return [f"emb_{i}" for i in range(embedding_dim)] + list(EXTRA_FEATURES)


def extra_features(texts: Sequence[str], tokens: Sequence[TokenizedPrompt], max_tokens: int) -> np.ndarray:
    out = np.empty((len(texts), len(EXTRA_FEATURES)), dtype=np.float32)
    for i, (text, tok) in enumerate(zip(texts, tokens, strict=True)):
        n = max(len(text), 1)
        # Counted with C-level loops: this runs on every Route call, on prompts of any length.
        ascii_chars = len(text.encode("ascii", "ignore"))
        out[i] = (
            math.log1p(tok.full_tokens),
            math.log1p(len(text)),
            math.log1p(text.count("\n")),
            sum(map(str.isdigit, text)) / n,
            (len(text) - ascii_chars) / n,
            float(tok.full_tokens + 2 > max_tokens),
        )
    return out


def build_features(embeddings: np.ndarray, extras: np.ndarray) -> np.ndarray:
    return np.hstack([embeddings, extras]).astype(np.float32, copy=False)
