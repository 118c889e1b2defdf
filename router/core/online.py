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
reported), the oldest replaced first.

A batch is compared with the whole memory in one matrix product, which reads the memory once per
batch rather than once per prompt. That product's rounding depends on the batch, and estimates must
not (the same request gets the same decision whatever the load), so it only shortlists: every entry
within a slack of a prompt's K-th best similarity, four times the most float32 rounding can move
that comparison, so the shortlist always holds the true K nearest. Those are then scored again one
prompt at a time in float64, in an order fixed by the entries alone, and the K best of that exact
score (ties to the lower slot) make the neighbourhood.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

K = 64
TAU = 0.1
STRENGTH = 1.0
DEFAULT_CAPACITY = 50_000
# Shortlist slack per dimension, in units of |prompt| x |entry|: float32 rounding moves a
# similarity of d-dimensional vectors by at most d x 6e-8 of that in any summation order, and a
# shortlist that must hold the true K nearest needs twice that bound; this is four times it.
SLACK_PER_DIM = 4 * float(np.finfo(np.float32).eps)


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
        self._max_norm = 0.0  # of any embedding held, for the shortlist's slack

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
                    self._max_norm = max(self._max_norm, float(np.linalg.norm(self._emb[row])))
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
            emb = self._emb[:n]
            prompts = np.ascontiguousarray(embeddings[:, : self.dim], dtype=np.float32)
            targets = [j for j, m in enumerate(models) if m in self._columns]
            columns = np.array([self._columns[models[j]] for j in targets], dtype=np.intp)
            shortlists = self._shortlists(emb, prompts)
            quality, output_tokens = quality.copy(), output_tokens.copy()
            for row, shortlist in enumerate(shortlists):
                near, sims = _nearest(emb, shortlist, prompts[row])
                weight = np.exp((sims - 1.0) / TAU)
                cells = np.ix_(near, columns)
                quality[row, targets] = _pull(weight, self._score[cells], quality[row, targets])
                output_tokens[row, targets] = _pull(weight, self._tokens[cells], output_tokens[row, targets])
        return quality, output_tokens

    def _shortlists(self, emb: np.ndarray, prompts: np.ndarray) -> list[np.ndarray]:
        """Per prompt, the entries that may be among its K nearest (all of them while K or fewer)."""
        n = len(emb)
        if n <= K:
            return [np.arange(n)] * len(prompts)
        approx = prompts @ emb.T  # one product for the batch; its rounding depends on the batch
        kth = np.partition(approx, n - K, axis=1)[:, n - K]
        slack = SLACK_PER_DIM * self.dim * np.linalg.norm(prompts, axis=1) * self._max_norm
        return [np.flatnonzero(approx[row] >= kth[row] - slack[row]) for row in range(len(prompts))]


def _nearest(emb: np.ndarray, shortlist: np.ndarray, prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The K entries of the shortlist most similar to the prompt, in slot order, and their
    similarities, computed from this prompt and these entries alone."""
    exact = (emb[shortlist].astype(np.float64) * prompt.astype(np.float64)).sum(axis=1)
    if len(shortlist) > K:
        keep = np.lexsort((shortlist, -exact))[:K]  # most similar first, ties to the lower slot
        keep.sort()
        shortlist, exact = shortlist[keep], exact[keep]
    return shortlist, exact


def _pull(weight: np.ndarray, values: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Per model, the prior pulled towards the neighbours' known values (neighbours x models)."""
    known = ~np.isnan(values)
    w = np.where(known, weight[:, None], 0.0)
    pulled = ((w * np.where(known, values, 0.0)).sum(axis=0) + STRENGTH * prior) / (w.sum(axis=0) + STRENGTH)
    return np.where(known.any(axis=0), pulled, prior)
