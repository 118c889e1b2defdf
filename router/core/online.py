"""What the router learns online from outcome feedback: a bounded memory of scored prompts, and how
it moves the estimates of prompts near them.

For a prompt and a model with remembered outcomes, the K most similar of them (cosine of the unit
embeddings) pull the bundle's estimate towards what they scored:

    q = (sum_i w_i s_i + STRENGTH * q_bundle) / (sum_i w_i + STRENGTH),   w_i = exp((cos_i - 1) / TAU)

and likewise the output length where outcomes reported it (and so the cost). Far outcomes weigh
almost nothing, so the bundle's estimate stands where there is no feedback nearby, and a prompt
asked again gets close to its own outcomes. It is the bundle's near-duplicate kernel widened to
what traffic teaches; the constants were chosen with the feedback replay (docs/BENCHMARKS.md).

Memory: at most `capacity` outcomes, the oldest dropped first (a FIFO per model's share of the
whole). Each prompt is computed on its own (one matrix-vector product per prompt), so estimates do
not depend on the batch, as everywhere else in the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

K = 64
TAU = 0.1
STRENGTH = 4.0
DEFAULT_CAPACITY = 20_000


class OnlineMemory:
    def __init__(self, dim: int, capacity: int = DEFAULT_CAPACITY) -> None:
        self.dim = dim
        self.capacity = capacity
        self._lock = threading.Lock()
        self._emb = np.empty((0, dim), dtype=np.float32)
        self._model = np.empty(0, dtype=object)
        self._score = np.empty(0, dtype=np.float64)
        self._tokens = np.empty(0, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._score)

    def add(
        self,
        embeddings: np.ndarray,
        models: Sequence[str],
        scores: Sequence[float],
        output_tokens: Sequence[float],
    ) -> None:
        """Outcomes (NaN output tokens where not reported); the oldest go once over capacity."""
        if not len(models):
            return
        with self._lock:
            emb = np.vstack([self._emb, np.asarray(embeddings, dtype=np.float32)[:, : self.dim]])
            model = np.concatenate([self._model, np.asarray(models, dtype=object)])
            score = np.concatenate([self._score, np.asarray(scores, dtype=np.float64)])
            tokens = np.concatenate([self._tokens, np.asarray(output_tokens, dtype=np.float64)])
            keep = slice(max(len(score) - self.capacity, 0), None)
            self._emb, self._model, self._score, self._tokens = (
                emb[keep],
                model[keep],
                score[keep],
                tokens[keep],
            )

    def adjust(
        self, embeddings: np.ndarray, models: Sequence[str], quality: np.ndarray, output_tokens: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(quality, output tokens), prompts x models, moved towards nearby outcomes."""
        with self._lock:
            emb, model, score, tokens = self._emb, self._model, self._score, self._tokens
        if not len(score):
            return quality, output_tokens
        columns = {m: np.nonzero(model == m)[0] for m in models}
        columns = {m: idx for m, idx in columns.items() if len(idx)}
        quality, output_tokens = quality.copy(), output_tokens.copy()
        for row in range(len(quality)):
            sims = emb @ np.asarray(embeddings[row, : self.dim], dtype=np.float32)  # one prompt alone
            for j, m in enumerate(models):
                idx = columns.get(m)
                if idx is None:
                    continue
                near = idx if len(idx) <= K else idx[np.argpartition(-sims[idx], K - 1)[:K]]
                weight = np.exp((sims[near].astype(np.float64) - 1.0) / TAU)
                quality[row, j] = (weight @ score[near] + STRENGTH * quality[row, j]) / (
                    weight.sum() + STRENGTH
                )
                known = ~np.isnan(tokens[near])
                if known.any():
                    w = weight[known]
                    output_tokens[row, j] = (w @ tokens[near][known] + STRENGTH * output_tokens[row, j]) / (
                        w.sum() + STRENGTH
                    )
        return quality, output_tokens
