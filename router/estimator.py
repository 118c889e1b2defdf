"""Prompt -> per-model estimates of quality and cost, from a loaded bundle.

The single path from text to estimates: the service runs it per batch of requests, and the trainer
runs it (with cached embeddings from the same embedder) for `router predict` and `router eval`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.bundle import Bundle, BundleError
from router.embedder import TokenizedPrompt
from router.features import build_features, extra_features


@dataclass(frozen=True)
class Estimates:
    """Rows are prompts, columns the bundle's models."""

    models: tuple[str, ...]
    quality: np.ndarray
    cost_usd: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray


class Estimator:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedPrompt]:
        return self.bundle.embedder.tokenize(texts)

    def embed(self, tokens: Sequence[TokenizedPrompt], batch_size: int = 32) -> np.ndarray:
        return self.bundle.embedder.embed_tokenized(tokens, batch_size=batch_size)

    def estimate(
        self, texts: Sequence[str], tokens: Sequence[TokenizedPrompt], embeddings: np.ndarray
    ) -> Estimates:
        b = self.bundle
        features = build_features(embeddings, extra_features(texts, tokens, b.embedder.max_tokens))
        quality, out_tokens = b.heads.run(features)
        word_pieces = np.array([t.full_tokens for t in tokens], dtype=float)
        chars = np.array([len(t) for t in texts], dtype=float)
        in_tokens = b.token_estimator.estimate(word_pieces, chars)
        return Estimates(b.models, quality, b.prices.cost_usd(in_tokens, out_tokens), in_tokens, out_tokens)

    def estimate_texts(self, texts: Sequence[str]) -> Estimates:
        tokens = self.tokenize(texts)
        return self.estimate(texts, tokens, self.embed(tokens))

    def self_check(self) -> None:
        """One prompt end to end: a graph that loads but computes garbage is refused here."""
        est = self.estimate_texts(["Which model should answer this question?"])
        values = [*est.quality.ravel(), *est.cost_usd.ravel()]
        if not all(math.isfinite(float(v)) for v in values):
            raise BundleError("heads produce non-finite estimates on a test prompt")


def open_bundle(path: object, *, provider: str = "auto", threads: int = 0) -> Estimator:
    """Loads, verifies and self-checks a bundle: the one way the CLI and the service open one."""
    from router.bundle import load_bundle

    estimator = Estimator(load_bundle(path, provider=provider, threads=threads))  # type: ignore[arg-type]
    estimator.self_check()
    return estimator
