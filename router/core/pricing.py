"""Pricing arithmetic: predicted cost = input tokens x input price + output tokens x output price.

Input tokens are counted on the whole prompt. Routing tables count tokens with their own tokenizer
(cl100k_base for the shipped ones), which is not available offline, so each bundle carries a linear
map from the embedder's word-piece and character counts to the table's token count, fitted on the
training prompts (its error is recorded in the manifest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PER_TOKEN = 1e-6  # prices are quoted in USD per million tokens
# A token count beyond this, in one call, is a unit slip or garbage, not an answer: refused where
# callers report counts, before it reaches a cost estimate.
MAX_TOKENS = 10_000_000
# Likewise a list price above this (USD per million tokens) is a unit slip, not a price.
MAX_USD_PER_MTOK = 1e6
# BPE tokenizers average about 4 characters per token on prose and fewer on code or hex; more than
# 8 is not seen, so the character count bounds an estimate the word pieces would leave too low.
MAX_CHARS_PER_TOKEN = 8.0


@dataclass(frozen=True)
class TokenEstimator:
    intercept: float
    per_word_piece: float
    per_char: float

    def estimate(self, word_pieces: np.ndarray, chars: np.ndarray) -> np.ndarray:
        """The table tokenizer's count; at least one token per MAX_CHARS_PER_TOKEN characters,
        since a run without spaces is a single [UNK] word piece however long it is."""
        raw = self.intercept + self.per_word_piece * word_pieces + self.per_char * chars
        floor = np.ceil(np.asarray(chars, dtype=float) / MAX_CHARS_PER_TOKEN)
        return np.maximum(np.maximum(np.rint(raw), floor), 1.0)

    @classmethod
    def fit(cls, word_pieces: np.ndarray, chars: np.ndarray, tokens: np.ndarray) -> TokenEstimator:
        design = np.column_stack([np.ones_like(word_pieces), word_pieces, chars]).astype(float)
        coef, *_ = np.linalg.lstsq(design, tokens.astype(float), rcond=None)
        return cls(float(coef[0]), float(coef[1]), float(coef[2]))


@dataclass(frozen=True)
class Prices:
    """Per-model list prices, in the bundle's model order."""

    models: tuple[str, ...]
    input_usd_per_mtok: np.ndarray
    output_usd_per_mtok: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, float, float]]) -> Prices:
        return cls(
            tuple(r[0] for r in rows),
            np.array([r[1] for r in rows], dtype=float),
            np.array([r[2] for r in rows], dtype=float),
        )

    def cost_usd(self, input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        """(prompts x models) cost from (prompts,) input and (prompts x models) output tokens."""
        return PER_TOKEN * (
            np.asarray(input_tokens, dtype=float)[:, None] * self.input_usd_per_mtok[None, :]
            + np.asarray(output_tokens, dtype=float) * self.output_usd_per_mtok[None, :]
        )
