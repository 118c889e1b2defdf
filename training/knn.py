"""The CARROT-style kNN reference router: cosine neighbours on the same embeddings.

Predicted quality and cost of a model are the means of its observed score and cost over the k
nearest training prompts. Reports show it beside the project, on the same split, in the same run.
"""

from __future__ import annotations

import numpy as np

K_CHOICES = (4, 8, 16, 32, 64, 128, 256)


class KnnRouter:
    def __init__(self, embeddings: np.ndarray, score: np.ndarray, cost: np.ndarray, k: int) -> None:
        self.embeddings = embeddings.astype(np.float32)
        self.score = score
        self.cost = cost
        self.k = min(k, len(embeddings))
        self._score_fallback = np.nanmean(score, axis=0)
        self._cost_fallback = np.nanmean(cost, axis=0)

    def predict(self, queries: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        q_out = np.empty((len(queries), self.score.shape[1]))
        c_out = np.empty_like(q_out)
        for start in range(0, len(queries), chunk):
            sims = queries[start : start + chunk] @ self.embeddings.T
            nn = np.argpartition(-sims, self.k - 1, axis=1)[:, : self.k]
            q_out[start : start + chunk] = self._mean(self.score[nn], self._score_fallback)
            c_out[start : start + chunk] = self._mean(self.cost[nn], self._cost_fallback)
        return q_out, c_out

    @staticmethod
    def _mean(values: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        observed = ~np.isnan(values)
        total = np.where(observed, values, 0.0).sum(axis=1)
        count = observed.sum(axis=1)
        return np.where(count > 0, total / np.maximum(count, 1), fallback)
