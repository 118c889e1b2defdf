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
reported), the oldest replaced first. Embeddings are held at unit length (cosines are what the rule
compares); one that is not finite or has no length is not learnt, and a prompt with such an
embedding keeps the bundle's estimates.

A batch is compared with the whole memory in one matrix product, which reads the memory once per
batch rather than once per prompt. That product's rounding depends on the batch, and estimates must
not (the same request gets the same decision whatever the load), so it only shortlists: every entry
within a slack of a prompt's K-th best similarity, several times the most float32 rounding can move
that comparison, so the shortlist always holds the K nearest. Those are then scored again one
prompt at a time, each similarity summed over the entry's own elements in a fixed order (so it is
the same whatever else the shortlist holds), and the K best of that score (ties to the lower slot)
make the neighbourhood. A prompt asked again and again leaves one entry per decision, all within
rounding of each other, so the shortlist can hold thousands of copies: entries are told apart by a
digest of their embedding, and each distinct one is scored once.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np

K = 64
TAU = 0.1
STRENGTH = 1.0
DEFAULT_CAPACITY = 50_000
# Shortlist slack per dimension, for unit vectors: float32 rounding moves a similarity of
# d-dimensional vectors by at most about d x 6e-8 in any summation order, the product that
# shortlists and the per-prompt score may each be off by that, and a shortlist that must hold the
# K nearest needs twice their sum; this is about four times it.
SLACK_PER_DIM = 4 * float(np.finfo(np.float32).eps)


class OnlineMemory:
    def __init__(self, dim: int, capacity: int = DEFAULT_CAPACITY) -> None:
        self.dim = dim
        self.capacity = capacity
        self._lock = threading.Lock()
        self._emb = np.zeros((capacity, dim), dtype=np.float32)
        self._digest = np.zeros(capacity, dtype=np.uint64)  # of each embedding: copies score alike
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
    ) -> int:
        """Outcomes: the decision each is for (`keys`), its prompt's embedding, the model, its score
        and output tokens (NaN where not reported). The oldest prompt goes once over capacity.
        Returns how many were not learnt: their embedding is not finite or has no length."""
        units = _unit(np.asarray(embeddings)[:, : self.dim])
        ignored = 0
        with self._lock:
            for key, unit, model, score, tokens in zip(
                keys, units, models, scores, output_tokens, strict=True
            ):
                if unit is None:
                    ignored += 1
                    continue
                row = self._row_of.get(key)
                if row is None:
                    row = self._next
                    old = self._key_of[row]
                    if old is not None:
                        del self._row_of[old]
                    self._row_of[key], self._key_of[row] = row, key
                    self._emb[row] = unit
                    self._digest[row] = int.from_bytes(
                        hashlib.blake2b(unit.tobytes(), digest_size=8).digest(), "little"
                    )
                    self._score[row] = np.nan
                    self._tokens[row] = np.nan
                    self._next = (self._next + 1) % self.capacity
                    self._size = min(self._size + 1, self.capacity)
                column = self._column(model)
                self._score[row, column] = score
                self._tokens[row, column] = tokens
        return ignored

    def adjust(
        self, embeddings: np.ndarray, models: Sequence[str], quality: np.ndarray, output_tokens: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(quality, output tokens), prompts x models, moved towards nearby outcomes."""
        with self._lock:
            n = self._size
            if n == 0:
                return quality, output_tokens
            emb = self._emb[:n]
            units = _unit(np.asarray(embeddings)[:, : self.dim])
            # a prompt without a usable embedding keeps the bundle's estimates
            kept = [(row, unit) for row, unit in enumerate(units) if unit is not None]
            if not kept:
                return quality, output_tokens
            rows = [row for row, _ in kept]
            prompts = np.vstack([unit for _, unit in kept])
            targets = [j for j, m in enumerate(models) if m in self._columns]
            columns = np.array([self._columns[models[j]] for j in targets], dtype=np.intp)
            shortlists = self._shortlists(emb, prompts)
            quality, output_tokens = quality.copy(), output_tokens.copy()
            for row, prompt, shortlist in zip(rows, prompts, shortlists, strict=True):
                near, sims = _nearest(emb, self._digest[shortlist], shortlist, prompt)
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
        slack = np.float32(SLACK_PER_DIM * self.dim)
        return [np.flatnonzero(approx[row] >= kth[row] - slack) for row in range(len(prompts))]


def _unit(vectors: np.ndarray) -> list[np.ndarray | None]:
    """Each row at unit length (float32, scaled in float64 so that tiny or huge ones survive), or
    None where it is not finite or has no length."""
    rows = np.asarray(vectors, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.max(np.abs(rows), axis=1, initial=0.0)
        scaled = rows / np.where(scale > 0, scale, 1.0)[:, None]
        norm = np.linalg.norm(scaled, axis=1)
    return [
        (scaled[i] / norm[i]).astype(np.float32) if np.isfinite(scale[i]) and scale[i] > 0 else None
        for i in range(len(rows))
    ]


def similarities(entries: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    """Cosines of unit float32 entries with a unit float32 prompt, each summed over its own
    elements in one fixed order: an entry's similarity does not depend on the other rows given."""
    return (entries * prompt).sum(axis=1).astype(np.float64)


def _nearest(
    emb: np.ndarray, digests: np.ndarray, shortlist: np.ndarray, prompt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The K entries of the shortlist most similar to the prompt, in slot order, and their
    similarities, computed from this prompt and these entries alone (copies of one embedding,
    known by their digests, once)."""
    _, first, copy_of = np.unique(digests, return_index=True, return_inverse=True)
    sims = similarities(emb[shortlist[first]], prompt)[copy_of.ravel()]
    if len(shortlist) > K:
        keep = np.lexsort((shortlist, -sims))[:K]  # most similar first, ties to the lower slot
        keep.sort()
        shortlist, sims = shortlist[keep], sims[keep]
    return shortlist, sims


def _pull(weight: np.ndarray, values: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Per model, the prior pulled towards the neighbours' known values (neighbours x models)."""
    known = ~np.isnan(values)
    w = np.where(known, weight[:, None], 0.0)
    pulled = ((w * np.where(known, values, 0.0)).sum(axis=0) + STRENGTH * prior) / (w.sum(axis=0) + STRENGTH)
    return np.where(known.any(axis=0), pulled, prior)
