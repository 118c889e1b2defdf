"""What the heads learn from a routing table: scores, billed output tokens and input token counts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.core.pricing import PER_TOKEN, TokenEstimator
from training.tables import RoutingTable


@dataclass
class Targets:
    score: np.ndarray  # prompts x models, NaN where unobserved
    output_tokens: np.ndarray  # prompts x models, billed output tokens, NaN where unknown
    input_tokens: np.ndarray  # prompts, NaN where the table has no count
    output_tokens_known: dict[str, bool]


def input_tokens(table: RoutingTable) -> np.ndarray:
    """Per prompt, the table's input token count (the mean over models where they differ)."""
    counts = table.matrix("input_tokens")
    with np.errstate(all="ignore"):
        observed = ~np.isnan(counts)
        total = np.where(observed, counts, 0.0).sum(axis=1)
        n = observed.sum(axis=1)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def build_targets(table: RoutingTable, in_tokens_est: np.ndarray) -> Targets:
    """Billed output tokens: the published count, else what cost_usd implies beyond the input part.

    Where a table publishes no output counts (dcrouter, MMLU rows of routellm_pair), cost_usd holds
    the input part only, so the implied output is 0 and the head learns the table's own billing.
    """
    score = table.matrix("score")
    out = table.matrix("output_tokens")
    cost = table.matrix("cost_usd")
    known_in = input_tokens(table)
    in_tokens = np.where(np.isnan(known_in), in_tokens_est, known_in)
    p_in = table.prices["input_usd_per_mtok"].to_numpy(float)
    p_out = table.prices["output_usd_per_mtok"].to_numpy(float)
    with np.errstate(all="ignore"):
        implied = (cost - in_tokens[:, None] * p_in[None, :] * PER_TOKEN) / (p_out[None, :] * PER_TOKEN)
    implied = np.where(p_out[None, :] > 0, np.clip(implied, 0.0, None), np.nan)
    billed = np.where(np.isnan(out), implied, out)
    known = {m: bool((~np.isnan(out[:, j])).any()) for j, m in enumerate(table.models)}
    return Targets(score, billed, known_in, known)


def fit_token_estimator(
    word_pieces: np.ndarray, chars: np.ndarray, table_tokens: np.ndarray
) -> tuple[TokenEstimator, float | None, str]:
    """Maps the embedder's counts to the table's tokenizer; identity on word pieces if it has none."""
    known = ~np.isnan(table_tokens)
    if known.sum() < 10:
        return (
            TokenEstimator(0.0, 1.0, 0.0),
            None,
            "word pieces of the embedder (the table has no input token counts)",
        )
    est = TokenEstimator.fit(word_pieces[known], chars[known], table_tokens[known])
    mae = float(np.abs(est.estimate(word_pieces[known], chars[known]) - table_tokens[known]).mean())
    return est, mae, "least squares on the training prompts' input_tokens"
