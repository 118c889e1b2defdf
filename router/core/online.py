"""What the router learns online from outcome feedback: a bounded memory of scored prompts, and how
it moves the estimates of prompts near them.

One entry per decision that got outcomes: its prompt's unit embedding and, per model, the score
(and output length) reported. For a prompt, the K most similar entries pull the bundle's estimate
of each model towards what that model scored on them:

    q = (sum_i w_i s_i + STRENGTH * q_bundle) / (sum_i w_i + STRENGTH),   w_i = exp((cos_i - 1) / TAU)

over the entries with an outcome of that model, and likewise the output length where outcomes
reported it (and so the cost). Far entries weigh almost nothing, so the bundle's estimate stands
where there is no feedback nearby, and a prompt asked again gets close to its own outcomes. It is
the bundle's neighbour memory extended by the traffic; the constants were chosen on validation
carved from `train` (docs/BENCHMARKS.md).

Memory: at most `capacity` prompts (about 1.6 kB each for the embedding, plus 16 bytes per model
reported), the oldest replaced first. Each prompt is computed on its own (one matrix-vector product
per prompt), so estimates do not depend on the batch, as everywhere else in the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

K = 64
TAU = 0.1
STRENGTH = 1.0
DEFAULT_CAPACITY = 50_000


class OnlineMemory:
    def __init__(self, dim: int, capacity: int = DEFAULT_CAPACITY) -> None:
        self.dim = dim
        self.capacity = capacity
        self._lock = threading.Lock()
        self._emb = np.zeros((capacity, dim), dtype=np.float32)
        self._score = np.full((capacity, 0), np.nan)
        self._tokens = np.full((capacity, 0), np.nan)
        self._columns: dict[str, int] = {}
        self._row_of: dict[str, int] = {}
        self._key_of: list[str | None] = [None] * capacity
        self._size = 0
        self._next = 0  # ring buffer: where the next new prompt goes

    def __len__(self) -> int:
        """Outcomes held (a prompt with outcomes of three models counts three)."""
        with self._lock:
            return int((~np.isnan(self._score[: self._size])).sum())

    def _column(self, model: str) -> int:
        if model not in self._columns:
            self._columns[model] = len(self._columns)
            pad = np.full((self.capacity, 1), np.nan)
            self._score = np.hstack([self._score, pad])
            self._tokens = np.hstack([self._tokens, pad.copy()])
        return self._columns[model]

    def add(
        self,
        keys: Sequence[str],
        embeddings: np.ndarray,
        models: Sequence[str],
        scores: Sequence[float],
        output_tokens: Sequence[float],
    ) -> None:
        """Outcomes: the decision each is for (`keys`), its prompt's embedding, the model, its score
        and output tokens (NaN where not reported). The oldest prompt goes once over capacity."""
        with self._lock:
            for key, emb, model, score, tokens in zip(
                keys, embeddings, models, scores, output_tokens, strict=True
            ):
                row = self._row_of.get(key)
                if row is None:
                    row = self._next
                    old = self._key_of[row]
                    if old is not None:
                        del self._row_of[old]
                    self._row_of[key], self._key_of[row] = row, key
                    self._emb[row] = np.asarray(emb[: self.dim], dtype=np.float32)
                    self._score[row] = np.nan
                    self._tokens[row] = np.nan
                    self._next = (self._next + 1) % self.capacity
                    self._size = min(self._size + 1, self.capacity)
                column = self._column(model)
                self._score[row, column] = score
                self._tokens[row, column] = tokens

    def adjust(
        self, embeddings: np.ndarray, models: Sequence[str], quality: np.ndarray, output_tokens: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(quality, output tokens), prompts x models, moved towards nearby outcomes."""
        with self._lock:
            n = self._size
            if n == 0:
                return quality, output_tokens
            emb, score, tokens = self._emb[:n], self._score[:n], self._tokens[:n]
            columns = {j: self._columns[m] for j, m in enumerate(models) if m in self._columns}
            quality, output_tokens = quality.copy(), output_tokens.copy()
            for row in range(len(quality)):
                sims = emb @ np.asarray(embeddings[row, : self.dim], dtype=np.float32)  # this prompt alone
                near = np.arange(n) if n <= K else np.argpartition(-sims, K - 1)[:K]
                weight = np.exp((sims[near].astype(np.float64) - 1.0) / TAU)
                for j, c in columns.items():
                    quality[row, j] = _pull(weight, score[near, c], quality[row, j])
                    output_tokens[row, j] = _pull(weight, tokens[near, c], output_tokens[row, j])
        return quality, output_tokens


def _pull(weight: np.ndarray, values: np.ndarray, prior: float) -> float:
    known = ~np.isnan(values)
    if not known.any():
        return prior
    w = weight[known]
    return float((w @ values[known] + STRENGTH * prior) / (w.sum() + STRENGTH))
