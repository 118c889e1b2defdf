"""The one feature code path: prompt text -> what the heads and the token map read.

Training and serving both call `featurize`, so a head never sees features computed another way
than it was trained on. The feature names are recorded in the bundle manifest and checked against
this module when a bundle is loaded.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.core.embedder import TokenizedPrompt

FEATURE_VERSION = "1"
# Cheap, length- and shape-aware signals that a sentence embedding normalises away.
EXTRA_FEATURES = ("log_tokens", "log_chars", "log_lines", "digit_frac", "non_ascii_frac", "truncated")


# A prompt with nothing visible has nothing to embed: the service refuses it, and so does a table.
BLANK = "must not be empty, nor only whitespace or invisible characters"


def blank(text: str) -> bool:
    """Nothing visible: only whitespace, controls and format characters (NUL, zero-width space)."""
    return all(unicodedata.category(c)[0] in "CZ" for c in text)


def feature_names(embedding_dim: int) -> list[str]:
    return [f"emb_{i}" for i in range(embedding_dim)] + list(EXTRA_FEATURES)


@dataclass(frozen=True)
class PromptFeatures:
    """Rows are prompts. `features` is what the heads read: the unit embedding, then the extras;
    `word_pieces` and `chars` are what the token map turns into the table's input tokens."""

    features: np.ndarray  # float32, prompts x (dim + len(EXTRA_FEATURES))
    word_pieces: np.ndarray  # float64, word pieces of the whole prompt
    chars: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.features)

    def rows(self, index: np.ndarray | slice) -> PromptFeatures:
        return PromptFeatures(self.features[index], self.word_pieces[index], self.chars[index])


def _extras(text: str, tokens: TokenizedPrompt, max_tokens: int) -> tuple[float, ...]:
    n = max(len(text), 1)
    # Counted with C-level loops: this runs on every Route call, on prompts of any length.
    ascii_chars = len(text.encode("ascii", "ignore"))
    return (
        math.log1p(tokens.full_tokens),
        math.log1p(len(text)),
        math.log1p(text.count("\n")),
        sum(map(str.isdigit, text)) / n,
        (len(text) - ascii_chars) / n,
        float(tokens.full_tokens + 2 > max_tokens),
    )


def featurize(
    texts: Sequence[str], tokens: Sequence[TokenizedPrompt], embeddings: np.ndarray, max_tokens: int
) -> PromptFeatures:
    """Features of prompts from their text, their tokens and their embeddings (in that order)."""
    features = np.empty((len(texts), embeddings.shape[1] + len(EXTRA_FEATURES)), dtype=np.float32)
    features[:, : embeddings.shape[1]] = embeddings
    for row, (text, tok) in enumerate(zip(texts, tokens, strict=True)):
        features[row, embeddings.shape[1] :] = _extras(text, tok, max_tokens)
    return PromptFeatures(
        features,
        np.array([t.full_tokens for t in tokens], dtype=np.float64),
        np.array([len(t) for t in texts], dtype=np.float64),
    )
